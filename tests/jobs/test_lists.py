"""Lists with actions (jobs.lists_views): scheduled and waiting jobs with "Run now", held ones
with "Release", failed ones with "Replay"; each by row or ticked, audited."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs import queueing, services
from jobs.models import Budget, Job
from runs import admission

pytestmark = pytest.mark.django_db(transaction=True)


def submit(workload, user, **kwargs) -> Job:
    return services.do_submit_job(workload=workload, input_text="Notes.", user=user, **kwargs)[0]


def last_event(job: Job):
    return job.events.order_by("-created_at", "-id").first()


def in_queue(job: Job) -> bool:
    return job.rq_job_id in queueing.queue(job.priority).get_job_ids()


def scheduled_in_rq(job: Job) -> bool:
    return job.rq_job_id in queueing.queue(job.priority).scheduled_job_registry.get_job_ids()


def test_run_now_starts_a_scheduled_job_at_once(redis_conn, client, workload, user, operator):
    job = submit(workload, user, start_at=timezone.now() + timedelta(hours=3))
    assert job.status == "scheduled"
    assert scheduled_in_rq(job)
    client.force_login(operator)
    page = client.get(reverse("jobs:list-scheduled"))
    assert str(job.code)[:8] in page.content.decode()

    response = client.post(reverse("jobs:list-scheduled"), {"one": str(job.code)})
    assert response.status_code == 302
    job.refresh_from_db()
    assert (job.status, job.scheduled_for, job.resume_at) == ("queued", None, None)
    event = last_event(job)
    assert (event.from_status, event.actor, event.reason) == (
        "scheduled",
        operator,
        "run now by an operator",
    )
    assert in_queue(job)
    assert not scheduled_in_rq(job)


def test_run_now_wakes_ticked_waiting_jobs_and_skips_the_others(
    redis_conn, client, workload, user, operator
):
    waiting = []
    for _ in range(2):
        job = submit(workload, user)
        queueing.remove(job)
        assert services.do_park_job(
            job,
            reason="concurrency cap full (1/1)",
            resume_at=timezone.now() + timedelta(hours=1),
            kind=Job.WaitKind.CAPACITY,
        )
        waiting.append(job)
    queued = submit(workload, user)
    client.force_login(operator)
    response = client.post(
        reverse("jobs:list-scheduled"), {"codes": [str(j.code) for j in [*waiting, queued]]}
    )
    assert response.status_code == 302
    assert [Job.objects.get(pk=j.pk).status for j in waiting] == ["queued", "queued"]
    assert all(in_queue(j) and not scheduled_in_rq(j) for j in waiting)
    messages = [str(m) for m in response.wsgi_request._messages]
    assert "2 job(s) sent to run now." in messages
    assert any("1 skipped" in m and "queued now" in m for m in messages)


def test_run_now_of_a_deferred_job_is_not_deferred_again(
    redis_conn, client, workload, user, operator, run_worker, monkeypatch
):
    workload.is_deferrable = True
    workload.save()
    monkeypatch.setattr(admission, "may_run_deferrable", lambda now, job=None: False)
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "scheduled"
    assert job.wait_reason.startswith("deferred to the off-peak window")

    client.force_login(operator)
    client.post(reverse("jobs:list-scheduled"), {"one": str(job.code)})
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_release_queues_a_held_job_once_its_budget_fits(
    redis_conn, client, workload, user, operator
):
    budget = Budget.objects.create(name="Tiny", cap_usd=Decimal("0.00000001"))
    job = submit(workload, user)
    assert job.status == "held"
    client.force_login(operator)
    response = client.post(reverse("jobs:list-held"), {"one": str(job.code)})
    messages = [str(m) for m in response.wsgi_request._messages]
    assert any("budget 'Tiny' still cannot take it" in m for m in messages)
    job.refresh_from_db()
    assert job.status == "held"

    # Raised without the save signal, which would release it by itself.
    Budget.objects.filter(pk=budget.pk).update(cap_nanos=10**12)
    client.post(reverse("jobs:list-held"), {"one": str(job.code)})
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.cost_reserved > 0
    assert last_event(job).actor == operator


def test_replay_from_the_failed_list(redis_conn, client, workload, user, operator):
    job = submit(workload, user)
    Job.objects.filter(pk=job.pk).update(status="failed", error="Rejected in review: no")
    client.force_login(operator)
    page = client.get(reverse("jobs:list-failed"))
    assert "Rejected in review: no" in page.content.decode()
    client.post(reverse("jobs:list-failed"), {"one": str(job.code)})
    job.refresh_from_db()
    assert job.status == "queued"
    assert last_event(job).data["replay"] == 1


def test_each_list_shows_only_its_jobs(redis_conn, client, workload, user, operator):
    scheduled = submit(workload, user, start_at=timezone.now() + timedelta(hours=3))
    queued = submit(workload, user)
    client.force_login(operator)
    page = client.get(reverse("jobs:list-held")).content.decode()
    assert str(scheduled.code) not in page
    assert str(queued.code) not in page
    page = client.get(reverse("jobs:list-scheduled")).content.decode()
    assert f"list-row-{scheduled.code}" in page
    assert f"list-row-{queued.code}" not in page
