"""End to end with real parts: the suite's Redis, the real worker code, the simulator over HTTP."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from decimal import Decimal

import django_rq
import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from jobs import queueing, reconcile, services
from jobs.models import Attempt, Job
from tests.conftest import BASE_DIR, queued_ids, spawn

pytestmark = pytest.mark.django_db(transaction=True)


def submit(workload, user, text="The quarterly meeting covered hiring and budget.") -> Job:
    return services.do_submit_job(workload=workload, input_text=text, user=user)[0]


def test_submitted_job_is_queued_under_its_deterministic_id(redis_conn, workload, user):
    job = submit(workload, user)
    assert queued_ids() == [f"job-{job.code}"]


def test_worker_runs_job_to_success_with_ledger_entry(redis_conn, workload, user, run_worker):
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert job.output_text
    attempt = Attempt.objects.get(job=job)
    assert attempt.http_status == 200
    assert attempt.tokens_in > 0
    assert attempt.tokens_out > 0
    expected = (attempt.tokens_in * Decimal(1) + attempt.tokens_out * Decimal(2)) / 1_000_000
    assert attempt.cost == expected
    assert job.cost_actual == expected
    assert list(job.events.values_list("to_status", flat=True)) == [
        "queued",
        "running",
        "succeeded",
    ]


def test_permanent_provider_error_sends_the_job_to_review_with_the_error(
    redis_conn, workload, user, simulator, run_worker
):
    simulator.control(script=[400])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "needs_review"  # a human retries or rejects it (review app)
    assert job.error_class == "http_400"
    assert "400" in job.error
    assert Attempt.objects.get(job=job).http_status == 400


def test_cancelled_job_never_calls_the_provider(redis_conn, workload, user, simulator, run_worker):
    job = submit(workload, user)
    services.do_cancel_job(job, actor=user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert simulator.counters()["requests_total"] == 0


def test_reconciler_brings_back_every_job_after_redis_is_wiped(
    redis_conn, workload, user, simulator, run_worker, settings
):
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    jobs = [submit(workload, user, f"text {i}") for i in range(12)]
    assert len(queued_ids()) == 12
    redis_conn.flushall()  # Redis restarted without persistence: every queue entry is gone
    assert queued_ids() == []

    report = reconcile.run()

    assert report.requeued == 12
    run_worker()
    statuses = set(Job.objects.filter(pk__in=[j.pk for j in jobs]).values_list("status", flat=True))
    assert statuses == {"succeeded"}
    assert simulator.counters()["requests_total"] == 12


def test_reconciler_leaves_healthy_queue_entries_alone(redis_conn, workload, user, settings):
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    submit(workload, user)
    assert reconcile.run().requeued == 0
    assert len(queued_ids()) == 1


def test_reconcile_command_reports_what_it_did(redis_conn, workload, user, settings, capsys):
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    submit(workload, user)
    redis_conn.flushall()
    call_command("reconcile")
    assert "requeued 1 job(s)" in capsys.readouterr().out


def test_stale_running_job_is_recovered_and_completed(
    redis_conn, workload, user, run_worker, settings
):
    job = submit(workload, user)
    token = services.do_start_run(job)  # a worker took it ...
    assert token
    redis_conn.flushall()  # ... then died, and its RQ entry is gone too
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))

    assert reconcile.run().recovered == 1
    run_worker()

    job.refresh_from_db()
    assert job.status == "succeeded"
    reasons = list(job.events.values_list("reason", flat=True))
    assert "worker lost: heartbeat stopped" in reasons


def test_running_job_with_fresh_heartbeat_is_not_recovered(redis_conn, workload, user):
    job = submit(workload, user)
    services.do_start_run(job)
    assert reconcile.run().recovered == 0
    job.refresh_from_db()
    assert job.status == "running"


def test_killed_worker_process_loses_no_job(redis_conn, workload, user, simulator, tmp_path):
    """SIGKILL a real worker process mid-call; a second worker finishes the job."""
    simulator.control(latency_ms=3000)
    job = submit(workload, user)
    env = worker_env(heartbeat=1, stale_after=3)
    worker = spawn([sys.executable, "manage.py", "worker", "--no-scheduler"], tmp_path, env)
    try:
        wait_for(lambda: Job.objects.get(pk=job.pk).status == "running", timeout=20)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    simulator.control(latency_ms=0)

    rescuer = spawn([sys.executable, "manage.py", "worker", "--no-scheduler"], tmp_path, env)
    try:
        wait_for(lambda: Job.objects.get(pk=job.pk).status == "succeeded", timeout=30)
    finally:
        rescuer.terminate()
        rescuer.wait(timeout=10)
    job.refresh_from_db()
    assert "worker lost: heartbeat stopped" in list(job.events.values_list("reason", flat=True))


def worker_env(*, heartbeat: int, stale_after: int) -> dict:
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        url = f"sqlite:///{database['NAME']}"
    else:
        url = (
            f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/"
            f"{database['NAME']}"
        )
    return {
        "DATABASE_URL": url,
        "REDIS_URL": settings.REDIS_URL,
        "AIQUEUE_HEARTBEAT_INTERVAL": str(heartbeat),
        "AIQUEUE_STALE_RUNNING_AFTER": str(stale_after),
        "AIQUEUE_RECONCILE_INTERVAL": "1",
        "AIQUEUE_ENQUEUE_GRACE": "0",
        "PYTHONPATH": str(BASE_DIR),
    }


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")


def test_parked_job_waits_then_runs_when_its_time_comes(redis_conn, workload, user, run_worker):
    job = submit(workload, user)
    redis_conn.flushall()
    resume_at = timezone.now() + timedelta(seconds=60)
    assert services.do_park_job(job, reason="rate limited", resume_at=resume_at)
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason == "rate limited"
    scheduled = django_rq.get_queue(job.priority).scheduled_job_registry.get_job_ids()
    assert scheduled == [job.rq_job_id]

    # Run the scheduled entry now, as RQ's scheduler would at resume_at.
    Job.objects.filter(pk=job.pk).update(resume_at=timezone.now())
    django_rq.get_queue(job.priority).enqueue_job(
        django_rq.get_queue(job.priority).fetch_job(job.rq_job_id)
    )
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert "resume time reached" in list(job.events.values_list("reason", flat=True))


def test_waiting_job_is_not_run_before_its_resume_time(redis_conn, workload, user, run_worker):
    job = submit(workload, user)
    redis_conn.flushall()
    services.do_park_job(job, reason="breaker open", resume_at=timezone.now() + timedelta(hours=1))
    # A stray queue entry (say, a duplicate) must not start it early.
    queueing.enqueue(job)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"


def test_reconciler_wakes_a_waiting_job_whose_schedule_was_lost(
    redis_conn, workload, user, run_worker, settings
):
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    job = submit(workload, user)
    services.do_park_job(
        job, reason="rate limited", resume_at=timezone.now() - timedelta(seconds=1)
    )
    redis_conn.flushall()
    assert reconcile.run().woken == 1
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
