"""Each escalation reason, driven through the real runner, worker and simulator."""

from __future__ import annotations

import uuid

import pytest

from jobs import services
from jobs.models import Job, Workload
from review import rules
from review.models import ReviewItem
from review.validation import InvalidOutput, validate_output
from tests.factories import submit

pytestmark = pytest.mark.django_db


def only_item(job: Job) -> ReviewItem:
    job.refresh_from_db()
    assert job.status == "needs_review"
    return ReviewItem.objects.get(job=job)


def test_permanent_error_escalates_as_failed_with_the_error(
    redis_conn, workload, user, simulator, run_worker
):
    simulator.control(script=[400])
    job = submit(workload, user, "Meeting notes about the budget.")
    run_worker()
    item = only_item(job)
    assert item.reason == "failed"
    assert item.evidence["kind"] == "permanent"
    assert item.evidence["http_status"] == 400
    assert job.error_class == "http_400"
    assert job.run_token is None
    assert list(job.events.values_list("to_status", flat=True)) == [
        "queued",
        "running",
        "needs_review",
    ]


def test_exhausted_retries_escalate_as_failed(redis_conn, workload, user, simulator, run_worker):
    # A read timeout after the provider took the request is a paid attempt (a 503 is free).
    workload.max_attempts = 1
    workload.save()
    workload.provider.read_timeout_s = 0.5
    workload.provider.save()
    simulator.control(script=[{"hang": 3}])
    job = submit(workload, user, "Meeting notes about hiring.")
    run_worker()
    item = only_item(job)
    assert item.reason == "failed"
    assert item.evidence["kind"] == "retries_exhausted"
    assert item.evidence["attempts"] == item.evidence["max_attempts"] == 1


def test_low_confidence_label_escalates_with_confidence_and_threshold(
    redis_conn, classify_workload, user, run_worker
):
    job = submit(classify_workload, user, "Buy cheap watches now [[low-confidence]]")
    run_worker()
    item = only_item(job)
    assert item.reason == "low_confidence"
    assert "0.5" in item.evidence["problem"]
    assert job.output_text in ("spam", "ham")
    assert item.output_text == job.output_text
    assert item.confidence == pytest.approx(0.35)


def test_confident_valid_label_succeeds_without_review(
    redis_conn, classify_workload, user, run_worker
):
    job = submit(classify_workload, user, "Lunch at noon tomorrow?")
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert job.confidence >= 0.8
    assert not ReviewItem.objects.exists()


def test_label_outside_allowed_labels_escalates_as_invalid_output(
    redis_conn, classify_workload, user, run_worker
):
    job = submit(classify_workload, user, "Hello there [[invalid-label]]")
    run_worker()
    item = only_item(job)
    assert item.reason == "invalid_output"
    assert "unknown-label" in item.evidence["problem"]
    assert job.output_text == "unknown-label"


def test_broken_json_extraction_escalates_as_invalid_output(
    redis_conn, extract_workload, user, run_worker
):
    job = submit(extract_workload, user, "Invoice 7 from ACME, total 120 EUR [[invalid-json]]")
    run_worker()
    item = only_item(job)
    assert item.reason == "invalid_output"
    assert "JSON" in item.evidence["problem"]


def test_valid_json_extraction_succeeds(redis_conn, extract_workload, user, run_worker):
    job = submit(extract_workload, user, "Invoice 8 from ACME, total 99 EUR")
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert not ReviewItem.objects.exists()


def test_sampled_successes_go_to_review(redis_conn, workload, user, run_worker):
    workload.review_sample_rate = 1.0
    workload.save()
    job = submit(workload, user, "Notes of the weekly meeting.")
    run_worker()
    item = only_item(job)
    assert item.reason == "sampled"
    assert item.evidence == {"sample_rate": 1.0}


def test_sampling_is_deterministic_per_job_and_close_to_the_rate():
    jobs = [Job(code=uuid.UUID(int=i * 7919)) for i in range(2000)]
    picked = [rules.is_sampled(job, 0.1) for job in jobs]
    assert picked == [rules.is_sampled(job, 0.1) for job in jobs]
    assert 150 <= sum(picked) <= 250
    assert not any(rules.is_sampled(job, 0.0) for job in jobs)


def test_escalation_from_a_run_that_lost_its_job_changes_nothing(redis_conn, workload, user):
    from review.services import do_escalate

    job = submit(workload, user, "text")
    token = services.do_start_run(job)
    services.do_cancel_job(job, actor=user)
    assert do_escalate(job, token, reason="failed", evidence={}) is None
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert not ReviewItem.objects.exists()


def test_label_validation_accepts_only_allowed_labels():
    workload = Workload(kind=Workload.Kind.CLASSIFY, labels=["spam", "ham"])
    assert validate_output(workload, " spam\n")[0] == "spam"
    with pytest.raises(InvalidOutput, match="eggs"):
        validate_output(workload, "eggs")


def test_extraction_validation_applies_the_workload_schema():
    workload = Workload(
        kind=Workload.Kind.EXTRACT,
        output_schema={
            "type": "object",
            "properties": {"total": {"type": "number"}},
            "required": ["total"],
        },
    )
    assert validate_output(workload, '{"total": 12.5}')[1] == {"total": 12.5}
    with pytest.raises(InvalidOutput, match="schema"):
        validate_output(workload, '{"vendor": "ACME"}')
    with pytest.raises(InvalidOutput, match="JSON"):
        validate_output(workload, "{not json")
