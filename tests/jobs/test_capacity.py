"""Concurrency caps (Redis leases), rate limits (GCRA) and the priority starvation guard, with
the suite's Redis, real worker code and processes, and the simulator over HTTP."""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import django_rq
import pytest
from django.utils import timezone

from jobs import services
from jobs.flow import leases, rate_limits
from jobs.flow.priorities import StarvationGuard
from jobs.models import Job, JobEvent
from runs import admission
from runs.worker import Worker
from tests.factories import submit
from tests.helpers import occupy, spawn, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = "Notes from the planning meeting."


def test_job_over_the_cap_waits_with_its_reason_and_runs_when_a_slot_frees(
    redis_conn, workload, user, run_worker, simulator
):
    workload.provider.max_concurrency = 1
    workload.provider.save()
    [resource] = leases.resources_for(workload)
    other = occupy([resource])

    job = submit(workload, user, TEXT)
    run_worker()

    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason == "concurrency cap full (1/1) for Test simulator"
    assert job.resume_at > timezone.now()  # the fallback wake-up
    assert leases.waiters(resource) == [str(job.code)]
    assert simulator.counters()["requests_total"] == 0

    admission.finish(job, other, ran=False)  # the other run ends: its slot frees

    job.refresh_from_db()
    assert job.status == "queued"
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert leases.in_use(resource) == 0


def test_waiters_wake_by_priority_then_in_submit_order(redis_conn, workload, user, run_worker):
    workload.concurrency_cap = 1
    workload.save()
    [resource] = leases.resources_for(workload)
    other = occupy([resource])
    low_1 = submit(workload, user, TEXT, priority="low")
    high = submit(workload, user, TEXT, priority="high")
    low_2 = submit(workload, user, TEXT, priority="low")
    run_worker()
    assert leases.waiters(resource) == [str(high.code), str(low_1.code), str(low_2.code)]

    admission.finish(high, other, ran=False)

    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses == {high.pk: "queued", low_1.pk: "waiting", low_2.pk: "waiting"}


def test_cancelled_waiter_is_skipped_when_a_slot_frees(redis_conn, workload, user, run_worker):
    workload.concurrency_cap = 1
    workload.save()
    [resource] = leases.resources_for(workload)
    other = occupy([resource])
    first = submit(workload, user, TEXT)
    second = submit(workload, user, TEXT)
    run_worker()
    services.do_cancel_job(first, actor=user)

    admission.finish(first, other, ran=False)

    second.refresh_from_db()
    assert second.status == "queued"


def test_cap_of_five_is_never_exceeded_by_several_worker_processes(
    redis_conn, workload, user, simulator, tmp_path
):
    workload.provider.max_concurrency = 5
    workload.provider.save()
    simulator.control(latency_ms=400)
    jobs = [submit(workload, user, text=f"meeting {i}") for i in range(30)]
    env = {**worker_env(heartbeat=1, stale_after=30), "AIQUEUE_CAPACITY_RECHECK": "5"}
    workers = [
        spawn(
            [sys.executable, "manage.py", "worker", *([] if i == 0 else ["--no-scheduler"])],
            tmp_path,
            env,
        )
        for i in range(7)
    ]
    try:
        wait_for(
            lambda: (
                Job.objects.filter(pk__in=[j.pk for j in jobs], status="succeeded").count() == 30
            ),
            timeout=300,
        )
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=20)
    counters = simulator.counters()
    assert counters["requests_total"] == 30
    assert counters["peak_in_flight"] <= 5
    assert JobEvent.objects.filter(reason__startswith="concurrency cap full (5/5)").exists()
    assert leases.in_use(leases.resources_for(workload)[0]) == 0


def test_a_dead_workers_lease_frees_itself(redis_conn, workload, user, simulator, tmp_path):
    workload.provider.max_concurrency = 1
    workload.provider.save()
    [resource] = leases.resources_for(workload)
    simulator.control(latency_ms=30_000)
    first = submit(workload, user, text="first")
    env = {**worker_env(heartbeat=1, stale_after=3), "AIQUEUE_LEASE_TTL": "3"}
    worker = spawn([sys.executable, "manage.py", "worker", "--no-scheduler"], tmp_path, env)
    try:
        wait_for(lambda: Job.objects.get(pk=first.pk).status == "running", timeout=30)
        assert leases.in_use(resource) == 1
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    assert leases.in_use(resource) == 1  # nobody released it ...
    wait_for(lambda: leases.in_use(resource) == 0, timeout=20)  # ... it expired by itself

    simulator.control(latency_ms=0)
    second = submit(workload, user, text="second")
    rescuer = spawn([sys.executable, "manage.py", "worker", "--no-scheduler"], tmp_path, env)
    try:
        wait_for(
            lambda: (
                set(
                    Job.objects.filter(pk__in=[first.pk, second.pk]).values_list(
                        "status", flat=True
                    )
                )
                == {"succeeded"}
            ),
            timeout=60,
        )
    finally:
        rescuer.terminate()
        rescuer.wait(timeout=20)


def test_rate_limited_job_is_parked_until_the_time_gcra_allows(
    redis_conn, workload, user, run_worker, simulator
):
    workload.provider.rpm_limit = 1
    workload.provider.save()
    first = submit(workload, user, text="first")
    second = submit(workload, user, text="second")
    run_worker()

    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == "succeeded"
    assert second.status == "waiting"
    assert second.wait_reason.startswith("rate limit (1 requests/min for Test simulator)")
    wait = second.resume_at - timezone.now()
    assert timedelta(seconds=50) < wait <= timedelta(seconds=60)
    assert simulator.counters()["requests_total"] == 1
    scheduled = django_rq.get_queue(second.priority).scheduled_job_registry.get_job_ids()
    assert scheduled == [second.rq_job_id]


def test_tokens_per_minute_limit_spaces_calls_by_their_token_cost(redis_conn, provider):
    provider.tpm_limit = 600
    assert rate_limits.acquire(provider, tokens=400).allowed
    refused = rate_limits.acquire(provider, tokens=400)
    assert not refused.allowed
    assert refused.limit == "600 tokens/min for Test simulator"
    # The bucket holds 600 tokens and refills 10/s; 200 are left, 200 more take 20 s.
    assert 18 < refused.wait_s <= 20
    assert rate_limits.acquire(provider, tokens=150).allowed


def test_starvation_guard_serves_low_under_sustained_high_load():
    guard = StarvationGuard(["high", "default", "low"], every=4)
    backlog = {"high": 100, "default": 100, "low": 100}
    taken = []
    order = guard.order()
    for _ in range(20):
        name = next(q for q in order if backlog[q])
        backlog[name] -= 1
        taken.append(name)
        order = guard.order(name)
    assert taken.count("low") == 4
    assert taken[:5] == ["high", "high", "high", "high", "low"]


@pytest.mark.parametrize("inline", [True, False])
def test_workers_take_low_while_high_is_still_full(redis_conn, settings, inline):
    settings.AIQUEUE_STARVATION_GUARD_EVERY = 2
    queues = [django_rq.get_queue(name) for name in ("high", "default", "low")]
    for _ in range(6):
        queues[0].enqueue("os.getpid", result_ttl=0)
    queues[2].enqueue("os.getpid", result_ttl=0)

    Worker(queues, connection=redis_conn, threads=1, inline=inline).work(burst=True, max_jobs=3)

    assert len(queues[2]) == 0
    assert len(queues[0]) == 4
