"""Replaying jobs (services.do_replay_job and its pages): the same job runs again as a new run
of its own history, reserved on its budgets and audited."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs import replay, services
from jobs.models import Budget, BudgetReservation, Job, Workload
from tests.factories import make_user

pytestmark = pytest.mark.django_db(transaction=True)


def submit(workload: Workload, user, text: str = "A text to summarize.") -> Job:
    return services.do_submit_job(workload=workload, input_text=text, user=user)[0]


def ended(workload: Workload, user, status: str, **fields) -> Job:
    """A job that ended as `status` without running (what replay reads is the row)."""
    job = submit(workload, user)
    services.budgets.release(job)
    Job.objects.filter(pk=job.pk).update(
        status=status, stage="done", finished_at=timezone.now(), error="boom", **fields
    )
    job.refresh_from_db()
    return job


def test_a_succeeded_job_replays_as_the_next_attempt_of_its_history(
    redis_conn, workload, user, operator, run_worker
):
    # One paid attempt allowed: the replay's run must count its attempts afresh.
    Workload.objects.filter(pk=workload.pk).update(max_attempts=1)
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"

    services.do_replay_job(job, actor=operator, overrides={"temperature": 0.2, "model": ""})
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.output_text == ""
    assert job.overrides == {"temperature": 0.2}
    event = job.events.order_by("-created_at", "-id").first()
    assert (event.from_status, event.to_status, event.actor) == ("succeeded", "queued", operator)
    assert event.data == {"replay": 1, "overrides": {"temperature": 0.2}}

    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert job.output_text
    assert list(job.attempts.order_by("number").values_list("number", flat=True)) == [1, 2]


@pytest.mark.parametrize("status", ["queued", "waiting", "held", "scheduled", "running"])
def test_a_job_on_its_way_is_not_replayed(workload, user, operator, status):
    job = submit(workload, user)
    Job.objects.filter(pk=job.pk).update(status=status)
    job.refresh_from_db()
    with pytest.raises(replay.ReplayError, match="only a finished job"):
        services.do_replay_job(job, actor=operator)
    assert not job.events.filter(data__has_key="replay").exists()


def test_a_replay_is_reserved_and_held_by_an_exhausted_budget(redis_conn, workload, user, operator):
    job = ended(workload, user, "failed")
    budget = Budget.objects.create(name="Tiny", cap_usd=Decimal("0.00000001"))
    services.do_replay_job(job, actor=operator)
    job.refresh_from_db()
    assert job.status == "held"
    assert "budget 'Tiny'" in job.wait_reason
    moves = list(job.events.order_by("created_at", "id").values_list("from_status", "to_status"))
    assert moves[-2:] == [("failed", "queued"), ("queued", "held")]
    budget.refresh_from_db()
    assert budget.reserved_nanos == 0


def test_a_replay_under_a_budget_reserves_its_worst_case(redis_conn, workload, user, operator):
    job = ended(workload, user, "cancelled")
    budget = Budget.objects.create(name="Roomy", cap_usd=Decimal("10"))
    services.do_replay_job(job, actor=operator)
    job.refresh_from_db()
    budget.refresh_from_db()
    assert job.status == "queued"
    assert job.cost_reserved > 0
    assert budget.reserved_nanos == BudgetReservation.objects.get(job=job).amount_nanos > 0


def test_a_rejecting_budget_refuses_the_replay_and_changes_nothing(
    redis_conn, workload, user, operator
):
    job = ended(workload, user, "failed")
    Budget.objects.create(
        name="Strict", cap_usd=Decimal("0.00000001"), on_exhausted=Budget.OnExhausted.REJECT
    )
    with pytest.raises(replay.ReplayError, match="exhausted"):
        services.do_replay_job(job, actor=operator)
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error == "boom"
    assert not job.events.filter(data__has_key="replay").exists()


def test_an_expired_job_replays_without_its_past_deadline(redis_conn, workload, user, operator):
    job = ended(workload, user, "expired", deadline=timezone.now() - timedelta(minutes=1))
    services.do_replay_job(job, actor=operator)
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.deadline is None
    assert "deadline_dropped" in job.events.get(data__has_key="replay").data


def test_a_document_is_not_replayed(provider, user, operator):
    document = Workload.objects.create(
        name="Docs", kind=Workload.Kind.DOCUMENT, provider=provider, model="sim-small"
    )
    job = Job.objects.create(workload=document, input_text="x", status="failed")
    with pytest.raises(replay.ReplayError, match="document"):
        services.do_replay_job(job, actor=operator)


# --- pages --------------------------------------------------------------------------------


def test_the_job_page_offers_replay_and_replays_with_overrides(
    redis_conn, client, workload, user, operator
):
    job = ended(workload, user, "failed")
    client.force_login(operator)
    page = client.get(job.get_absolute_url())
    assert reverse("jobs:replay", args=[job.code]) in page.content.decode()
    response = client.post(
        reverse("jobs:replay", args=[job.code]), {"model": "sim-large", "temperature": "0.5"}
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.overrides == {"model": "sim-large", "temperature": 0.5}


def test_a_reviewer_may_not_replay_someone_elses_job(client, workload, user):
    job = ended(workload, user, "failed")
    client.force_login(make_user("rita", role="reviewer"))
    assert client.post(reverse("jobs:replay", args=[job.code])).status_code == 403
    job.refresh_from_db()
    assert job.status == "failed"


def bulk_filters(workload: Workload) -> dict[str, str]:
    return {"status": "failed", "workload": str(workload.pk)}


def test_bulk_replay_counts_what_the_filters_select_then_replays_them(
    redis_conn, client, workload, provider, user, operator
):
    other = Workload.objects.create(
        name="Other", kind=Workload.Kind.SUMMARIZE, provider=provider, model="sim-small"
    )
    chosen = [ended(workload, user, "failed") for _ in range(2)]
    left = [
        ended(workload, user, "succeeded"),
        ended(other, user, "failed"),
        submit(workload, user),
    ]
    client.force_login(operator)
    page = client.get(reverse("jobs:replay-bulk"), bulk_filters(workload))
    assert page.status_code == 200
    assert page.context["count"] == 2
    assert "Replay 2 jobs" in page.content.decode()

    response = client.post(
        reverse("jobs:replay-bulk"),
        {**bulk_filters(workload), "expected": "2", "as_of": page.context["as_of"]},
    )
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("jobs:list") + "?")
    assert [Job.objects.get(pk=j.pk).status for j in chosen] == ["queued", "queued"]
    assert [Job.objects.get(pk=j.pk).status for j in left] == ["succeeded", "failed", "queued"]


def test_bulk_replay_replays_nothing_when_more_match_than_were_shown(
    redis_conn, client, workload, user, operator
):
    jobs = [ended(workload, user, "failed") for _ in range(3)]
    client.force_login(operator)
    response = client.post(
        reverse("jobs:replay-bulk"),
        {**bulk_filters(workload), "expected": "2", "as_of": timezone.now().isoformat()},
    )
    assert response.status_code == 400
    assert "3 jobs match these filters now, not 2" in response.content.decode()
    assert {Job.objects.get(pk=j.pk).status for j in jobs} == {"failed"}


def test_bulk_replay_of_a_submitter_takes_only_their_own_jobs(
    redis_conn, client, workload, user, other_user
):
    mine = ended(workload, user, "failed")
    ended(workload, other_user, "failed")
    client.force_login(user)
    page = client.get(reverse("jobs:replay-bulk"), {"status": "failed"})
    assert page.context["count"] == 1
    client.post(
        reverse("jobs:replay-bulk"),
        {"status": "failed", "expected": "1", "as_of": page.context["as_of"]},
    )
    assert Job.objects.get(pk=mine.pk).status == "queued"
    assert Job.objects.filter(status="failed").count() == 1
