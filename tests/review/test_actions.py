"""Each reviewer action: its effect on the job, its audit event, and the next-item flow."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.urls import reverse

from jobs.models import Attempt, Budget, Job, ModelPrice, Provider
from review import services
from review.models import ReviewItem

pytestmark = pytest.mark.django_db

LOW = "Cheap pills here [[low-confidence]]"


def last_event(job: Job):
    return job.events.order_by("-created_at", "-id").first()


def test_approve_succeeds_the_job_as_human_approved(
    redis_conn, classify_workload, escalate, reviewer, client
):
    (item,) = escalate(classify_workload, LOW)
    client.force_login(reviewer)
    response = client.post(reverse("review:approve", args=[item.pk]))
    assert response.status_code == 302
    job = Job.objects.get(pk=item.job_id)
    assert job.status == "succeeded"
    assert job.is_human_approved
    event = last_event(job)
    assert (event.from_status, event.to_status, event.actor) == (
        "needs_review",
        "succeeded",
        reviewer,
    )
    item.refresh_from_db()
    assert (item.status, item.resolution, item.resolved_by) == ("resolved", "approved", reviewer)


def test_approve_as_is_is_refused_for_invalid_output(
    redis_conn, classify_workload, escalate, reviewer
):
    (item,) = escalate(classify_workload, "Hi [[invalid-label]]")
    with pytest.raises(services.ReviewError, match="fails validation"):
        services.do_approve(item, reviewer)
    item.refresh_from_db()
    assert item.status == "open"
    assert Job.objects.get(pk=item.job_id).status == "needs_review"


def test_edit_and_approve_keeps_the_original_beside_the_correction(
    redis_conn, classify_workload, escalate, reviewer, client
):
    (item,) = escalate(classify_workload, "Hi [[invalid-label]]")
    client.force_login(reviewer)
    response = client.post(
        reverse("review:correct", args=[item.pk]), {"corrected_output": "ham", "note": "greeting"}
    )
    assert response.status_code == 302
    job = Job.objects.get(pk=item.job_id)
    assert job.status == "succeeded"
    assert job.output_text == "unknown-label"
    assert job.corrected_output == "ham"
    assert job.final_output == "ham"
    assert job.output_data == {"labels": ["ham"]}
    assert job.is_human_approved
    assert last_event(job).actor == reviewer
    item.refresh_from_db()
    assert (item.resolution, item.corrected_output, item.note) == ("corrected", "ham", "greeting")
    # The job page shows both.
    page = client.get(job.get_absolute_url()).content.decode()
    assert '<pre class="output" id="job-corrected-output" hx-disable>ham</pre>' in page
    assert '<pre class="output" id="job-output" hx-disable>unknown-label</pre>' in page
    assert "Human-approved" in page


def test_corrected_label_outside_the_allowed_labels_is_refused(
    redis_conn, classify_workload, escalate, reviewer, client
):
    (item,) = escalate(classify_workload, "Hi [[invalid-label]]")
    client.force_login(reviewer)
    response = client.post(reverse("review:correct", args=[item.pk]), {"corrected_output": "eggs"})
    assert response.status_code == 400
    assert "not one of" in response.content.decode()
    assert Job.objects.get(pk=item.job_id).status == "needs_review"


def test_corrected_extraction_must_match_the_schema(
    redis_conn, extract_workload, escalate, reviewer
):
    extract_workload.output_schema = {
        "type": "object",
        "properties": {"total": {"type": "number"}},
        "required": ["total"],
    }
    extract_workload.save()
    (item,) = escalate(extract_workload, "Invoice total 12 [[invalid-json]]")
    with pytest.raises(services.ReviewError, match="not valid"):
        services.do_correct(item, reviewer, corrected_output='{"total": "twelve"}')
    with pytest.raises(services.ReviewError, match="not valid"):
        services.do_correct(item, reviewer, corrected_output="{oops")
    job = services.do_correct(item, reviewer, corrected_output='{"total": 12}')
    assert job.status == "succeeded"
    assert json.loads(job.corrected_output) == {"total": 12}


def test_retry_with_overrides_runs_again_and_appends_attempts(
    redis_conn, classify_workload, escalate, reviewer, client, run_worker, simulator
):
    other = Provider.objects.create(
        name="Second simulator", kind=Provider.Kind.SIMULATED, base_url=f"{simulator.url}/v1"
    )
    (item,) = escalate(classify_workload, LOW)
    job = item.job
    client.force_login(reviewer)
    response = client.post(
        reverse("review:retry", args=[item.pk]),
        {
            "provider": other.pk,
            "model": "sim-large",
            "temperature": "0.3",
            "prompt": "Cheap pills here",  # the marker removed: a confident answer
        },
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.overrides == {
        "provider_id": other.pk,
        "model": "sim-large",
        "temperature": 0.3,
        "prompt": "Cheap pills here",
    }
    assert last_event(job).actor == reviewer

    run_worker()

    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    attempts = list(Attempt.objects.filter(job=job).order_by("number"))
    assert [a.number for a in attempts] == [1, 2]
    assert (attempts[1].provider, attempts[1].model) == (other, "sim-large")
    assert not job.is_human_approved  # the new output was not looked at by a human
    item.refresh_from_db()
    assert item.resolution == "retried"


def test_reject_requires_a_reason_and_fails_the_job(
    redis_conn, classify_workload, escalate, reviewer, client
):
    (item,) = escalate(classify_workload, LOW)
    client.force_login(reviewer)
    response = client.post(reverse("review:reject", args=[item.pk]), {"reason": "  "})
    assert response.status_code == 400
    assert Job.objects.get(pk=item.job_id).status == "needs_review"

    client.post(reverse("review:reject", args=[item.pk]), {"reason": "ambiguous message"})

    job = Job.objects.get(pk=item.job_id)
    assert job.status == "failed"
    assert job.error == "Rejected in review: ambiguous message"
    event = last_event(job)
    assert (event.to_status, event.actor, event.reason) == (
        "failed",
        reviewer,
        "rejected in review: ambiguous message",
    )


def test_resolved_item_cannot_be_resolved_twice(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer
):
    (item,) = escalate(classify_workload, LOW)
    services.do_approve(item, reviewer)
    with pytest.raises(services.ReviewError, match="already resolved"):
        services.do_reject(ReviewItem.objects.get(pk=item.pk), second_reviewer, reason="late")
    assert Job.objects.get(pk=item.job_id).status == "succeeded"


def test_after_an_action_the_reviewer_lands_on_the_next_open_item(
    redis_conn, classify_workload, escalate, reviewer, client
):
    first, second = escalate(classify_workload, LOW, "More pills [[low-confidence]]")
    client.force_login(reviewer)
    response = client.post(reverse("review:approve", args=[first.pk]))
    assert response.url == second.get_absolute_url()
    response = client.post(reverse("review:approve", args=[second.pk]))
    assert response.url == reverse("review:inbox")
    assert "All clear" in client.get(reverse("review:inbox")).content.decode()


def test_bulk_actions_process_each_item_and_summarise(
    redis_conn, classify_workload, escalate, reviewer, client
):
    items = escalate(classify_workload, LOW, "Two [[low-confidence]]", "Three [[invalid-label]]")
    client.force_login(reviewer)
    ids = [str(item.pk) for item in items]

    response = client.post(reverse("review:bulk"), {"items": ids, "action": "approve"}, follow=True)

    page = response.content.decode()
    assert "Approved 2 items. Skipped 1" in page
    statuses = [Job.objects.get(pk=item.job_id).status for item in items]
    assert statuses == ["succeeded", "succeeded", "needs_review"]

    client.post(reverse("review:bulk"), {"items": ids[2:], "action": "reject", "reason": "junk"})
    assert Job.objects.get(pk=items[2].job_id).status == "failed"


def test_model_output_is_escaped_on_the_inbox_and_item_pages(
    redis_conn, classify_workload, escalate, reviewer, client
):
    classify_workload.labels = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>"]
    classify_workload.system_prompt = "Labels: " + ", ".join(classify_workload.labels)
    classify_workload.max_output_tokens = 50
    classify_workload.save()
    (item,) = escalate(classify_workload, LOW)
    assert item.reason == "low_confidence"
    assert item.job.output_text in classify_workload.labels
    client.force_login(reviewer)
    for url in (reverse("review:inbox"), item.get_absolute_url(), item.job.get_absolute_url()):
        page = client.get(url).content.decode()
        assert "<script>alert" not in page
        assert "<img src=x" not in page
        escaped = "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert escaped or "&lt;img src=x onerror=alert(2)&gt;" in page


def test_a_retry_on_a_dearer_model_is_budgeted_at_that_models_price(
    redis_conn, classify_workload, escalate, reviewer, run_worker, simulator
):
    ModelPrice.objects.create(
        provider=classify_workload.provider,
        model="sim-large",
        input_per_mtok=Decimal("1000"),
        output_per_mtok=Decimal("2000"),
    )
    budget = Budget.objects.create(name="Pilot", cap_usd=Decimal("0.01"))
    (item,) = escalate(classify_workload, LOW)  # one call on the cheap model: well inside
    calls = simulator.counters()["requests_total"]

    services.do_claim(item, reviewer)
    job = services.do_retry(item, reviewer, overrides={"model": "sim-large"})
    run_worker()

    # The dearer call's worst case does not fit the cap: the job waits for budget instead of
    # making a call that would pass it.
    job.refresh_from_db()
    budget.refresh_from_db()
    assert job.status == "held", job.error
    assert simulator.counters()["requests_total"] == calls
    assert budget.spent_nanos + budget.reserved_nanos <= budget.cap_nanos


def test_a_retry_on_a_model_without_a_price_is_refused_when_a_budget_applies(
    redis_conn, classify_workload, escalate, reviewer, client
):
    Budget.objects.create(name="Pilot", cap_usd=Decimal("5"))
    (item,) = escalate(classify_workload, LOW)
    client.force_login(reviewer)
    response = client.post(
        reverse("review:retry", args=[item.pk]), {"model": "sim-unpriced"}, follow=True
    )
    page = response.content.decode()
    assert "Not retried: a budget applies, and model &#x27;sim-unpriced&#x27;" in page
    item.refresh_from_db()
    assert item.is_open  # nothing changed: the reviewer can pick a priced model
    assert Job.objects.get(pk=item.job_id).status == "needs_review"
