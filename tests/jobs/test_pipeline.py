"""End to end with real parts: the suite's Redis, the real worker code, the simulator over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import django_rq
import pytest
from django.core.management import call_command
from django.utils import timezone

from jobs import queueing, services
from jobs.models import Attempt, Job
from runs import reconcile
from tests.factories import submit
from tests.helpers import queued_ids, spawn, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)


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


def test_reconciler_brings_back_jobs_whose_queued_entry_is_on_no_queue(
    redis_conn, workload, user, simulator, run_worker, settings, monkeypatch
):
    """Seen after worker kills: an RQ entry that says "queued" but is on no queue (the worker
    popped it and died before starting it), so nothing would ever run the job. The reconciler
    looks for it on its queue: always for a job that ran before, and for the oldest queued
    jobs of each priority (a lost pop was at the head of its queue)."""
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    monkeypatch.setattr(reconcile, "SEARCH_QUEUE_HEAD", 2)  # the two oldest
    monkeypatch.setattr(reconcile, "SEARCH_LANE_HEAD", 2)  # of the priority, and of the lane
    recovered = submit(workload, user)
    Job.objects.filter(pk=recovered.pk).update(run_by="host/123/456")  # it ran before
    oldest_fresh = submit(workload, user, "a fresh job, never run")
    younger_fresh = submit(workload, user, "a younger fresh job")
    assert younger_fresh.status == "queued"
    Job.objects.filter(pk=recovered.pk).update(queued_at=timezone.now() - timedelta(minutes=3))
    Job.objects.filter(pk=oldest_fresh.pk).update(queued_at=timezone.now() - timedelta(minutes=2))
    redis_conn.delete(queueing.queue(recovered.priority).key)  # every entry off the queue
    assert redis_conn.hget(f"rq:job:{oldest_fresh.rq_job_id}", "status") == b"queued"

    report = reconcile.run()

    # The recovered job, and the oldest fresh one (the head); not searched: the younger one.
    assert report.requeued == 2
    assert sorted(queued_ids()) == sorted([recovered.rq_job_id, oldest_fresh.rq_job_id])
    run_worker()
    assert Job.objects.get(pk=recovered.pk).status == "succeeded"
    assert Job.objects.get(pk=oldest_fresh.pk).status == "succeeded"


def test_reconciler_finds_a_lost_pop_of_a_lane_queued_behind_an_older_flood(
    redis_conn, workload, user, other_user, run_worker, settings, monkeypatch
):
    """With fair share the head of a queue holds the oldest job of each lane, so a dead
    worker's lost pop may be younger than the priority's oldest jobs: the oldest of each lane
    are looked for too."""
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    monkeypatch.setattr(reconcile, "SEARCH_QUEUE_HEAD", 2)
    flood = [submit(workload, user, f"flood {n}") for n in range(4)]
    lost = submit(workload, other_user, "popped by a worker that died")
    key = queueing.queue(lost.priority).key
    assert queued_ids()[:2] == [flood[0].rq_job_id, lost.rq_job_id]  # the head, with fair share
    redis_conn.lrem(key, 0, lost.rq_job_id)

    report = reconcile.run()

    assert report.requeued == 1
    assert lost.rq_job_id in queued_ids()
    run_worker()
    assert Job.objects.get(pk=lost.pk).status == "succeeded"


def test_reconciler_brings_back_jobs_a_dead_worker_had_started_in_redis_only(
    redis_conn, workload, user, simulator, run_worker, settings
):
    """Seen after a worker kill under load: the worker took the entry and marked it started in
    RQ, then died before the run began, so the row still says queued. RQ gives such an entry
    up only at its started registry's cleanup, 15 minutes on; the reconciler asks whether the
    worker that started it is still there."""
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    orphaned, live = submit(workload, user, "taken by a dead worker"), submit(workload, user)
    dead_pid = _a_dead_pid()
    registrations = {
        orphaned: ("worker.dead", {"hostname": socket.gethostname(), "pid": dead_pid}),
        live: ("worker.live", {"hostname": socket.gethostname(), "pid": os.getpid()}),
    }
    for job, (worker_name, fields) in registrations.items():
        redis_conn.hset(f"rq:worker:{worker_name}", mapping=fields)
        redis_conn.hset(
            f"rq:job:{job.rq_job_id}", mapping={"status": "started", "worker_name": worker_name}
        )
        redis_conn.lrem(queueing.queue(job.priority).key, 0, job.rq_job_id)
        redis_conn.zadd(f"rq:wip:{job.priority}", {f"{job.rq_job_id}:exec1": 9e9})
    # A worker whose registration has lapsed, on any host, is gone too.
    lapsed = submit(workload, user, "taken by a worker on another host")
    redis_conn.hset(
        f"rq:job:{lapsed.rq_job_id}", mapping={"status": "started", "worker_name": "far.1"}
    )
    redis_conn.lrem(queueing.queue(lapsed.priority).key, 0, lapsed.rq_job_id)

    report = reconcile.run()

    assert report.requeued == 2
    assert sorted(queued_ids()) == sorted([orphaned.rq_job_id, lapsed.rq_job_id])
    # The dead execution is dropped, so RQ's cleanup will not mark the new entry failed.
    assert redis_conn.zrange(f"rq:wip:{orphaned.priority}", 0, -1) == [
        f"{live.rq_job_id}:exec1".encode()
    ]
    run_worker()
    assert Job.objects.get(pk=orphaned.pk).status == "succeeded"
    assert Job.objects.get(pk=lapsed.pk).status == "succeeded"
    assert Job.objects.get(pk=live.pk).status == "queued"  # its worker is alive: left to it


def _a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


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
    # Its process is gone from this host: recovered at once, not after the stale threshold.
    assert "worker lost: its process is gone" in list(job.events.values_list("reason", flat=True))


def test_parked_job_waits_then_runs_when_its_time_comes(redis_conn, workload, user, run_worker):
    job = submit(workload, user)
    redis_conn.flushall()
    resume_at = timezone.now() + timedelta(seconds=60)
    assert services.do_park_job(
        job, reason="rate limited", resume_at=resume_at, kind=Job.WaitKind.RATE_LIMIT
    )
    job.refresh_from_db()
    assert job.status == "waiting"
    assert (job.wait_reason, job.wait_kind) == ("rate limited", "rate_limit")
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
    services.do_park_job(
        job,
        reason="breaker open",
        resume_at=timezone.now() + timedelta(hours=1),
        kind=Job.WaitKind.BREAKER,
    )
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
        job,
        reason="rate limited",
        resume_at=timezone.now() - timedelta(seconds=1),
        kind=Job.WaitKind.RATE_LIMIT,
    )
    redis_conn.flushall()
    assert reconcile.run().woken == 1
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_reconciler_wakes_a_job_whose_scheduled_entry_nobody_serves(
    redis_conn, workload, user, run_worker
):
    # The entry is still in RQ's schedule, but no scheduler moves it (the one holding the lock
    # died with its worker, and the lock outlives it by a minute): the job must not wait on it.
    job = submit(workload, user)
    redis_conn.flushall()
    services.do_park_job(
        job,
        reason="rate limited",
        resume_at=timezone.now() + timedelta(hours=1),
        kind=Job.WaitKind.RATE_LIMIT,
    )
    assert job.rq_job_id.encode() in redis_conn.zrange("rq:scheduled:default", 0, -1)
    assert reconcile.run().woken == 0  # not due: the entry is left to the scheduler

    Job.objects.filter(pk=job.pk).update(
        resume_at=timezone.now() - timedelta(seconds=reconcile.SCHEDULE_LATE_S + 1)
    )
    assert reconcile.run().woken == 1
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    reasons = list(job.events.values_list("reason", flat=True))
    assert "woken by the reconciler: RQ's scheduler did not move it in time" in reasons
