"""Backpressure, deadlines, start times, deferrable and paused workloads, cancel (bulk and API),
with the real Redis, worker code and simulator."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal

import django_rq
import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from jobs import services
from jobs.models import Budget, Job
from runs import admission, reconcile
from tests.factories import submit

pytestmark = pytest.mark.django_db

TEXT = "Minutes of the weekly sync."


def post_job(client, token, body: dict, path="/api/jobs"):
    return client.post(
        path,
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )


def test_full_workload_queue_answers_429_with_retry_after_and_creates_nothing(
    client, token, workload, redis_conn
):
    workload.max_queued = 2
    workload.save()
    answers = [post_job(client, token, {"workload": workload.name, "input": "x"}) for _ in range(3)]

    assert [a.status_code for a in answers] == [202, 202, 429]
    assert answers[2]["Retry-After"] == "30"
    assert "queue for 'Summaries' is full" in answers[2].json()["error"]
    assert Job.objects.count() == 2


def test_global_queue_limit_answers_429(client, token, workload, redis_conn, settings):
    settings.AIQUEUE_MAX_QUEUED = 1
    assert post_job(client, token, {"workload": workload.name, "input": "x"}).status_code == 202
    refused = post_job(client, token, {"workload": workload.name, "input": "y"})
    assert refused.status_code == 429
    assert "at capacity" in refused.json()["error"]
    assert Job.objects.count() == 1


def test_form_says_the_queue_is_full_and_submits_nothing(user_client, workload, redis_conn):
    workload.max_queued = 1
    workload.save()
    submit(workload, None, TEXT)
    response = user_client.post(
        "/jobs/new/", {"workload": workload.pk, "input_text": "hello", "idempotency_key": "k1"}
    )
    assert response.status_code == 400  # the form again, with why (issue 18)
    assert "is full (1 jobs waiting, limit 1)" in response.content.decode()
    assert Job.objects.count() == 1


def test_rejecting_budget_answers_429_over_the_api(client, token, workload, redis_conn, user):
    budget = Budget.objects.create(
        name="one call", cap_usd=Decimal("0.0006"), on_exhausted="reject"
    )
    first = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    assert 2 * first.cost_reserved > budget.cap_usd  # one job's worst case fits, two do not
    refused = post_job(client, token, {"workload": workload.name, "input": "x"})
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert "exhausted" in refused.json()["error"]
    assert list(Job.objects.all()) == [first]


def test_a_job_no_renewal_lets_in_answers_400_not_429(client, token, workload, redis_conn):
    Budget.objects.create(name="frozen", cap_usd=Decimal("0"), on_exhausted="reject")
    refused = post_job(client, token, {"workload": workload.name, "input": "x"})
    assert refused.status_code == 400  # retrying later does not help: the cap must be raised
    assert "runs only once the cap is raised" in refused.json()["error"]
    assert not Job.objects.exists()


def test_job_past_its_deadline_expires_without_calling_the_provider(
    redis_conn, workload, user, run_worker, simulator
):
    budget = Budget.objects.create(name="monthly", cap_usd=Decimal("5"))
    job = submit(workload, user, TEXT, deadline=timezone.now() + timedelta(hours=1))
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))

    run_worker()

    job.refresh_from_db()
    budget.refresh_from_db()
    assert job.status == "expired"
    assert simulator.counters()["requests_total"] == 0
    assert budget.reserved_nanos == 0


def test_reconciler_expires_held_and_scheduled_jobs_past_their_deadline(
    redis_conn, workload, user, simulator
):
    Budget.objects.create(name="empty", cap_usd=Decimal("0"))
    held = submit(workload, user, TEXT, deadline=timezone.now() + timedelta(hours=1))
    Budget.objects.all().delete()
    scheduled = submit(
        workload,
        user,
        TEXT,
        start_at=timezone.now() + timedelta(hours=2),
        deadline=timezone.now() + timedelta(hours=3),
    )
    assert [Job.objects.get(pk=j.pk).status for j in (held, scheduled)] == ["held", "scheduled"]
    Job.objects.update(deadline=timezone.now() - timedelta(seconds=1))

    assert reconcile.run().expired == 2
    assert set(Job.objects.values_list("status", flat=True)) == {"expired"}
    assert simulator.counters()["requests_total"] == 0


def test_requested_start_time_schedules_the_job_until_then(
    redis_conn, workload, user, run_worker, simulator, django_capture_on_commit_callbacks
):
    start = timezone.now() + timedelta(hours=1)
    with django_capture_on_commit_callbacks(execute=True):
        job = submit(workload, user, TEXT, start_at=start)
    job.refresh_from_db()
    assert job.status == "scheduled"
    assert job.resume_at == start
    registry = django_rq.get_queue(job.priority).scheduled_job_registry
    assert registry.get_job_ids() == [job.rq_job_id]

    run_worker()
    assert simulator.counters()["requests_total"] == 0

    # Its time comes: RQ's scheduler moves the entry onto the queue.
    Job.objects.filter(pk=job.pk).update(
        resume_at=timezone.now(), scheduled_for=timezone.now() - timedelta(seconds=1)
    )
    queue = django_rq.get_queue(job.priority)
    queue.enqueue_job(queue.fetch_job(job.rq_job_id))
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_deferrable_job_waits_for_the_off_peak_window(
    redis_conn, workload, user, run_worker, simulator, settings
):
    now = timezone.localtime()
    settings.AIQUEUE_OFFPEAK_START = (now.hour + 2) % 24
    settings.AIQUEUE_OFFPEAK_END = (now.hour + 4) % 24
    settings.AIQUEUE_DEFER_QUEUE_BELOW = 0
    workload.is_deferrable = True
    workload.save()
    job = submit(workload, user, TEXT)

    run_worker()

    job.refresh_from_db()
    assert job.status == "scheduled"
    assert job.wait_reason.startswith("deferred to the off-peak window")
    assert timezone.localtime(job.resume_at).hour == settings.AIQUEUE_OFFPEAK_START
    assert job.resume_at > timezone.now()
    assert simulator.counters()["requests_total"] == 0


def test_deferrable_job_runs_at_once_when_the_queue_is_quiet(
    redis_conn, workload, user, run_worker, settings
):
    now = timezone.localtime()
    settings.AIQUEUE_OFFPEAK_START = (now.hour + 2) % 24
    settings.AIQUEUE_OFFPEAK_END = (now.hour + 4) % 24
    settings.AIQUEUE_DEFER_QUEUE_BELOW = 5
    workload.is_deferrable = True
    workload.save()
    job = submit(workload, user, TEXT)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_off_peak_window_may_span_midnight(settings):
    settings.AIQUEUE_OFFPEAK_START, settings.AIQUEUE_OFFPEAK_END = 22, 6
    tz = timezone.get_current_timezone()
    assert admission.in_offpeak_window(datetime(2025, 1, 1, 23, tzinfo=tz))
    assert admission.in_offpeak_window(datetime(2025, 1, 2, 5, tzinfo=tz))
    assert not admission.in_offpeak_window(datetime(2025, 1, 2, 12, tzinfo=tz))


def test_paused_workloads_jobs_wait_and_resume_from_the_admin(
    admin_client, redis_conn, workload, user, run_worker, simulator
):
    job = submit(workload, user, TEXT)
    workload.is_paused = True
    workload.save()
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason == "workload paused"
    assert simulator.counters()["requests_total"] == 0

    admin_client.post(
        "/admin/jobs/workload/",
        {"action": "resume", "_selected_action": [workload.pk]},
    )

    job.refresh_from_db()
    assert job.status == "queued"
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_bulk_cancel_from_the_list_cancels_only_the_ticked_jobs(
    user_client, redis_conn, workload, user, run_worker, simulator
):
    jobs = [submit(workload, user, TEXT) for _ in range(3)]
    response = user_client.post("/jobs/cancel/", {"codes": [str(jobs[0].code), str(jobs[1].code)]})
    assert response.status_code == 302
    run_worker()
    statuses = [Job.objects.get(pk=j.pk).status for j in jobs]
    assert statuses == ["cancelled", "cancelled", "succeeded"]
    assert simulator.counters()["requests_total"] == 1


def test_bulk_cancel_skips_other_users_jobs(client, other_user, redis_conn, workload, user):
    theirs = submit(workload, user, TEXT)
    client.force_login(other_user)
    client.post("/jobs/cancel/", {"codes": [str(theirs.code)]})
    theirs.refresh_from_db()
    assert theirs.status == "queued"


def test_list_has_a_checkbox_per_cancellable_job(user_client, redis_conn, workload, user):
    job = submit(workload, user, TEXT)
    page = user_client.get("/jobs/").content.decode()
    assert f'name="codes" value="{job.code}" form="bulk-cancel"' in page
    assert 'action="/jobs/cancel/"' in page


def test_list_offers_checkboxes_only_for_jobs_the_viewer_may_cancel(
    client, redis_conn, workload, user, operator
):
    # Like a reviewer: may see every job (view_job), may change only their own.
    viewer = User.objects.create_user("vera", "vera@example.com", "pw-vera-123")
    viewer.user_permissions.add(Permission.objects.get(codename="view_job"))
    theirs = submit(workload, user, TEXT)
    client.force_login(viewer)

    page = client.get("/jobs/").content.decode()
    assert str(theirs.code)[:8] in page
    assert 'name="codes"' not in page
    assert "Cancel selected" not in page

    own = submit(workload, viewer, TEXT)
    done = submit(workload, viewer, TEXT)
    Job.objects.filter(pk=done.pk).update(status="succeeded")
    page = client.get("/jobs/").content.decode()
    assert f'name="codes" value="{own.code}"' in page
    assert f'value="{theirs.code}"' not in page
    assert f'value="{done.code}"' not in page
    assert "Cancel selected" in page

    client.force_login(operator)  # may change every job
    page = client.get("/jobs/").content.decode()
    assert f'name="codes" value="{theirs.code}"' in page
    assert f'name="codes" value="{own.code}"' in page


def test_cancel_over_the_api(client, token, workload, redis_conn, run_worker, simulator):
    code = post_job(client, token, {"workload": workload.name, "input": "x"}).json()["code"]
    cancelled = post_job(client, token, {}, path=f"/api/jobs/{code}/cancel")
    again = post_job(client, token, {}, path=f"/api/jobs/{code}/cancel")
    run_worker()
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert again.status_code == 409
    assert simulator.counters()["requests_total"] == 0


def test_api_accepts_a_start_time_and_a_deadline(client, token, workload, redis_conn):
    start = timezone.now() + timedelta(hours=1)
    body = post_job(
        client,
        token,
        {
            "workload": workload.name,
            "input": "x",
            "start_at": start.isoformat(),
            "deadline": (start + timedelta(hours=1)).isoformat(),
        },
    ).json()
    assert body["status"] == "scheduled"
    assert body["scheduled_for"] == start.isoformat()


def test_api_refuses_a_deadline_in_the_past(client, token, workload, redis_conn):
    past = (timezone.now() - timedelta(minutes=1)).isoformat()
    refused = post_job(client, token, {"workload": workload.name, "input": "x", "deadline": past})
    assert refused.status_code == 400
    assert not Job.objects.exists()
