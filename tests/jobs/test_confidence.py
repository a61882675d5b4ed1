"""A confidence for every kind (jobs.kinds.confidence_from), end to end with the real worker
and the simulator over HTTP: token logprobs where the provider gives them (OpenAI-compatible),
a self-rating otherwise, and the review rule "confidence below" acting on each."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from jobs import kinds
from jobs.models import Job, ModelPrice, Provider, Workload
from review.models import ReviewItem
from tests.factories import INVOICE_SCHEMA, make_workload, submit

pytestmark = pytest.mark.django_db

TEXT = "Weekly meeting: hiring plan, budget review, office move."
LOW = TEXT + " [[low-confidence]]"


@pytest.fixture
def anthropic(simulator):
    provider = Provider.objects.create(
        name="Sim (Anthropic API)", kind=Provider.Kind.ANTHROPIC, base_url=f"{simulator.url}/v1"
    )
    ModelPrice.objects.create(
        provider=provider, model="claude-sim", input_per_mtok=1, output_per_mtok=2
    )
    return provider


def run(workload, user, run_worker, text) -> Job:
    job = submit(workload, user, text)
    run_worker()
    job.refresh_from_db()
    return job


@pytest.mark.parametrize("kind", [Workload.Kind.SUMMARIZE, Workload.Kind.GENERATE])
def test_free_text_on_an_openai_compatible_provider_is_judged_by_its_tokens_logprobs(
    redis_conn, provider, user, run_worker, kind
):
    workload = make_workload(provider, kind, name=f"{kind} notes", confidence_threshold=0.5)
    assert kinds.confidence_from(workload) == "logprobs"  # the default, "auto"
    assert kinds.build_request(submit(workload, user, TEXT)).logprobs
    sure = run(workload, user, run_worker, TEXT)
    assert sure.status == "succeeded"
    assert 0.5 <= sure.confidence <= 1
    assert "Confidence:" not in sure.output_text  # nothing asked of the model itself

    unsure = run(workload, user, run_worker, LOW)
    assert unsure.status == "needs_review"
    item = ReviewItem.objects.get(job=unsure)
    assert item.reason == "low_confidence"
    assert unsure.confidence < 0.5


def test_free_text_on_anthropic_rates_itself_on_a_last_line_that_is_stripped(
    redis_conn, anthropic, user, run_worker
):
    workload = make_workload(
        anthropic, Workload.Kind.SUMMARIZE, model="claude-sim", confidence_threshold=0.5
    )
    assert kinds.confidence_from(workload) == "self_rated"
    assert "rate your confidence" in kinds.system_prompt_for(workload)
    sure = run(workload, user, run_worker, TEXT)
    assert sure.status == "succeeded"
    assert 0.8 <= sure.confidence <= 0.97
    assert "Confidence" not in sure.output_text
    unsure = run(workload, user, run_worker, LOW)
    assert unsure.status == "needs_review"
    assert unsure.confidence == 0.3


def test_extract_is_judged_by_logprobs_or_by_the_confidence_its_schema_asks_for(
    redis_conn, provider, anthropic, user, run_worker
):
    on_openai = make_workload(
        provider, Workload.Kind.EXTRACT, output_schema=INVOICE_SCHEMA, confidence_threshold=0.5
    )
    assert run(on_openai, user, run_worker, TEXT).status == "succeeded"
    assert run(on_openai, user, run_worker, LOW).status == "needs_review"

    rated = {
        **INVOICE_SCHEMA,
        "properties": {**INVOICE_SCHEMA["properties"], "confidence": {"type": "number"}},
    }
    on_anthropic = make_workload(
        anthropic,
        Workload.Kind.EXTRACT,
        name="Invoices (Anthropic)",
        model="claude-sim",
        output_schema=rated,
        confidence_threshold=0.5,
    )
    assert kinds.confidence_from(on_anthropic) == "self_rated"
    sure = run(on_anthropic, user, run_worker, TEXT)
    assert (sure.status, sure.confidence) == ("succeeded", 0.9)
    unsure = run(on_anthropic, user, run_worker, LOW)
    assert (unsure.status, unsure.confidence) == ("needs_review", 0.3)


def test_off_asks_for_nothing_and_judges_nothing(redis_conn, provider, user, run_worker):
    workload = make_workload(
        provider, Workload.Kind.SUMMARIZE, confidence_source="off", confidence_threshold=0.5
    )
    request = kinds.build_request(submit(workload, user, TEXT))
    assert not request.logprobs
    assert "confidence" not in request.system_prompt.lower()
    job = run(workload, user, run_worker, LOW)
    assert (job.status, job.confidence) == ("succeeded", None)


def test_a_classify_workload_cannot_be_self_rated(provider):
    workload = Workload(
        name="Sentiment",
        kind=Workload.Kind.CLASSIFY,
        provider=provider,
        model="sim-small",
        labels=["positive", "negative"],
        confidence_source="self_rated",
    )
    with pytest.raises(ValidationError, match="label's probability"):
        workload.full_clean()


@pytest.mark.django_db(transaction=True)
def test_existing_workloads_keep_what_they_did_before_the_field(provider):
    """Migration 0017: self-rated ones stay self-rated, classify keeps its label's probability
    ("auto"), the rest had no confidence ("off"): no prompt changes under them."""
    before = [("jobs", "0016_i23_scoped_budgets_and_alerts")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    OldWorkload = old.get_model("jobs", "Workload")  # noqa: N806 - a model class
    common = {"provider_id": provider.pk, "model": "sim-small"}
    OldWorkload.objects.create(name="rated", kind="generate", self_rated_confidence=True, **common)
    OldWorkload.objects.create(name="plain", kind="summarize", **common)
    OldWorkload.objects.create(name="labels", kind="classify", labels=["a", "b"], **common)
    # Forward to every app's latest, not just jobs': going back to 0016 also unapplied the
    # migrations that depend on 0017 (batches 0002), and later tests need them.
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    sources = dict(Workload.objects.values_list("name", "confidence_source"))
    assert sources == {"rated": "self_rated", "plain": "off", "labels": "auto"}


def test_the_workload_admin_offers_the_confidence_source(admin_client, workload):
    page = admin_client.get(f"/admin/jobs/workload/{workload.pk}/change/").content.decode()
    assert 'id="id_confidence_source"' in page
    assert "Automatic: logprobs where the provider gives them, else self-rated" in page
