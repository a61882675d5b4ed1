"""Each workload kind end to end: real worker, suite's Redis, the simulator over HTTP."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from jobs import services
from jobs.models import Attempt, Job, Workload
from jobs.providers.openai import OpenAIProvider
from review.models import ReviewItem
from tests.factories import INVOICE_SCHEMA, make_workload

pytestmark = pytest.mark.django_db

LABELS = ["billing", "bug", "feature_request"]


def run(workload, user, run_worker, text="", **kwargs) -> Job:
    job, _ = services.do_submit_job(workload=workload, input_text=text, user=user, **kwargs)
    run_worker()
    job.refresh_from_db()
    return job


# --------------------------------------------------------------------------- classify


@pytest.fixture
def classifier(provider):
    return make_workload(
        provider,
        Workload.Kind.CLASSIFY,
        system_prompt="Route the ticket.",
        labels=LABELS,
        max_output_tokens=5,
        confidence_threshold=0.6,
    )


def test_classify_returns_a_label_of_the_set_with_logprob_confidence(
    redis_conn, classifier, user, run_worker
):
    job = run(classifier, user, run_worker, "I was charged twice this month.")
    assert job.status == "succeeded"
    assert job.output_text in LABELS
    assert job.output_data == {"labels": [job.output_text]}
    assert 0.8 <= job.confidence <= 1.0
    assert job.template_version == classifier.template_version


def test_classify_label_outside_the_set_goes_to_review_as_invalid_output(
    redis_conn, classifier, user, run_worker
):
    job = run(classifier, user, run_worker, "Something odd [[invalid-label]]")
    assert job.status == "needs_review"
    item = ReviewItem.objects.get(job=job)
    assert item.reason == "invalid_output"
    assert "unknown-label" in item.evidence["problem"]
    assert job.output_text == "unknown-label"


def test_classify_low_confidence_goes_to_review(redis_conn, classifier, user, run_worker):
    job = run(classifier, user, run_worker, "Not sure what this is [[low-confidence]]")
    assert job.status == "needs_review"
    assert ReviewItem.objects.get(job=job).reason == "low_confidence"
    assert job.confidence == pytest.approx(0.35)
    assert job.output_text in LABELS  # kept for the reviewer


def test_classify_request_names_the_labels_for_the_model(classifier):
    job = Job(workload=classifier, input_text="x", template_version=classifier.template_version)
    from jobs import kinds

    request = kinds.build_request(job)
    assert "Labels: billing, bug, feature_request" in request.system_prompt
    assert request.labels == LABELS


def test_multi_label_answer_is_split_and_each_label_checked(provider):
    from jobs import kinds
    from jobs.providers.base import Completion

    workload = make_workload(provider, "classify", labels=LABELS, multi_label=True)
    ok = kinds.parse(workload, Completion(text="Bug, billing", tokens_in=1, tokens_out=1))
    assert ok.ok
    assert ok.output_data == {"labels": ["bug", "billing"]}
    bad = kinds.parse(workload, Completion(text="bug, spam", tokens_in=1, tokens_out=1))
    assert bad.reason == "invalid_output"
    assert "'spam'" in bad.problem


# --------------------------------------------------------------------------- extract


@pytest.fixture
def extractor(provider):
    return make_workload(
        provider,
        Workload.Kind.EXTRACT,
        system_prompt="Extract the invoice fields.",
        output_schema=INVOICE_SCHEMA,
    )


def test_extract_output_validates_against_the_schema(redis_conn, extractor, user, run_worker):
    job = run(extractor, user, run_worker, "ACME invoice, total 120.50, due 2025-03-01")
    assert job.status == "succeeded"
    assert set(job.output_data) >= {"vendor", "total", "due_date"}
    assert job.attempts.count() == 1


def test_extract_schema_violation_gets_one_repair_call_then_review(
    redis_conn, extractor, user, run_worker, simulator
):
    job = run(extractor, user, run_worker, "ACME invoice [[schema-violation]]")
    assert job.status == "needs_review"
    attempts = list(Attempt.objects.filter(job=job))
    assert len(attempts) == 2  # the answer, then exactly one repair
    assert all(a.cost > 0 for a in attempts)
    item = ReviewItem.objects.get(job=job)
    assert item.reason == "invalid_output"
    assert "required property" in item.evidence["first_error"]
    assert item.evidence["repaired"] is False


def test_extract_invalid_json_is_repaired_when_the_second_answer_is_valid(
    redis_conn, extractor, user, run_worker, monkeypatch
):
    # The simulator answers the same input the same way, so a successful repair needs the
    # provider seam: the first answer is broken JSON, the repair call goes to the simulator.
    real_complete = OpenAIProvider.complete
    prompts = []

    def complete(self, request, on_delta=None):
        prompts.append(request.user_prompt)
        if len(prompts) == 1:
            from jobs.providers.base import Completion

            return Completion(text='{"vendor": "ACME", "total": ', tokens_in=10, tokens_out=5)
        return real_complete(self, request, on_delta)

    monkeypatch.setattr(OpenAIProvider, "complete", complete)
    job = run(extractor, user, run_worker, "ACME invoice, total 99, due 2025-01-01")
    assert job.status == "succeeded"
    assert len(prompts) == 2
    assert "It is not valid: the answer is not valid JSON" in prompts[1]
    assert job.attempts.count() == 2


def test_extract_invalid_json_twice_goes_to_review(redis_conn, extractor, user, run_worker):
    job = run(extractor, user, run_worker, "[[invalid-json]]")
    assert job.status == "needs_review"
    assert job.attempts.count() == 2
    assert "not valid JSON" in ReviewItem.objects.get(job=job).evidence["problem"]


def test_a_transient_failure_of_the_repair_call_is_retried(
    redis_conn, extractor, user, run_worker, simulator
):
    # First answer (invalid JSON by the marker), the repair call fails once with a 503, its
    # retry answers (still invalid: the marker stays in the prompt).
    simulator.control(script=[200, 503, 200])
    job = run(extractor, user, run_worker, "ACME invoice [[invalid-json]]")
    assert job.status == "needs_review"
    assert list(job.attempts.values_list("http_status", flat=True)) == [200, 503, 200]
    item = ReviewItem.objects.get(job=job)
    assert item.reason == "invalid_output"
    assert item.evidence["repaired"] is False


def test_a_repair_that_cannot_be_made_leaves_the_reviewer_the_first_answer(
    redis_conn, extractor, user, run_worker
):
    extractor.max_attempts = 1
    extractor.save()
    job = run(extractor, user, run_worker, "ACME invoice [[invalid-json]]")
    assert job.status == "needs_review"
    assert job.attempts.count() == 1  # the repair would have been a second call
    item = ReviewItem.objects.get(job=job)
    assert item.reason == "invalid_output"
    assert "attempts were used" in item.evidence["repair_error"]
    assert item.evidence["first_answer"]
    assert item.output_text == item.evidence["first_answer"]


def test_extract_workload_requires_a_valid_schema(provider):
    workload = Workload(
        name="x", kind="extract", provider=provider, model="m", output_schema={"type": 5}
    )
    with pytest.raises(ValidationError) as excinfo:
        workload.full_clean()
    assert "output_schema" in excinfo.value.message_dict


# --------------------------------------------------------------------------- summarize, generate


def test_summarize_streams_free_text_within_limits(redis_conn, provider, user, run_worker):
    workload = make_workload(
        provider, Workload.Kind.SUMMARIZE, min_output_chars=20, max_output_chars=5000
    )
    job = run(workload, user, run_worker, "The quarterly meeting covered hiring and budget.")
    assert job.status == "succeeded"
    assert 20 <= len(job.output_text) <= 5000


def test_generate_output_longer_than_the_limit_goes_to_review(
    redis_conn, provider, user, run_worker
):
    workload = make_workload(provider, Workload.Kind.GENERATE, max_output_chars=40)
    job = run(workload, user, run_worker, "Write about kettles and toasters.")
    assert job.status == "needs_review"
    item = ReviewItem.objects.get(job=job)
    assert item.reason == "invalid_output"
    assert "more than 40" in item.evidence["problem"]


def test_self_rated_confidence_is_parsed_and_low_values_go_to_review(provider):
    from jobs import kinds
    from jobs.providers.base import Completion

    workload = make_workload(
        provider, Workload.Kind.GENERATE, confidence_source="self_rated", confidence_threshold=0.7
    )
    text = "A fine kettle that boils fast.\nConfidence: 0.4"
    verdict = kinds.parse(workload, Completion(text=text, tokens_in=1, tokens_out=1))
    assert verdict.output_text == "A fine kettle that boils fast."
    assert verdict.confidence == 0.4
    assert verdict.reason == "low_confidence"


# --------------------------------------------------------------------------- templates


def test_named_fields_fill_the_template_and_the_job_records_its_version(
    redis_conn, provider, user, run_worker, simulator
):
    workload = make_workload(
        provider,
        Workload.Kind.CLASSIFY,
        labels=["positive", "negative"],
        prompt_template="Product: {product}\nReview: {review}",
        max_output_tokens=5,
    )
    assert workload.input_fields == ["product", "review"]
    workload.system_prompt = "Classify the sentiment."
    workload.save()
    assert workload.template_version == 2
    assert list(workload.template_versions.values_list("version", flat=True)) == [2, 1]

    job = run(
        workload,
        user,
        run_worker,
        "product: Kettle\nreview: {braces} stay",
        input_data={"product": "Kettle", "review": "{braces} stay"},
    )
    assert job.status == "succeeded"
    assert job.template_version == 2
    from jobs import kinds

    request = kinds.build_request(job)
    assert request.user_prompt == "Product: Kettle\nReview: {braces} stay"


def test_unchanged_prompts_keep_the_template_version(provider):
    workload = make_workload(provider, Workload.Kind.GENERATE)
    workload.max_output_tokens = 100
    workload.save()
    assert workload.template_version == 1


def test_new_job_form_has_one_input_per_named_field(redis_conn, provider, user_client):
    workload = make_workload(
        provider,
        Workload.Kind.CLASSIFY,
        labels=["positive", "negative"],
        prompt_template="Product: {product}\nReview: {review}",
    )
    page = user_client.get(f"/jobs/new/?workload={workload.pk}").content.decode()
    assert 'name="field_product"' in page
    assert 'name="field_review"' in page
    assert 'name="input_text"' not in page

    response = user_client.post(
        "/jobs/new/",
        {"workload": workload.pk, "field_product": "Kettle", "field_review": "Loud"},
    )
    assert response.status_code == 302
    job = Job.objects.get()
    assert job.input_data == {"product": "Kettle", "review": "Loud"}
    assert job.input_text == "product: Kettle\nreview: Loud"


def test_admin_previews_the_prompt_with_the_sample_input(provider, admin_client):
    workload = make_workload(
        provider,
        Workload.Kind.CLASSIFY,
        labels=["positive", "negative"],
        prompt_template="Review: {review}",
        sample_input={"review": "<b>Great</b> kettle"},
    )
    page = admin_client.get(f"/admin/jobs/workload/{workload.pk}/change/").content.decode()
    assert "Review: &lt;b&gt;Great&lt;/b&gt; kettle" in page
    assert "Labels: positive, negative" in page
