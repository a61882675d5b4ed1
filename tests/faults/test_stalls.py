"""A worker that stalls (SIGSTOP: a long GC or swap pause, a frozen VM) with calls in flight,
while another worker runs the reconciler. Real `manage.py worker` processes on the suite's
Redis and database, calling the simulator over HTTP, on a classification workload (its calls
do not stream, so a late answer is read whole).

The stall rule (runs.reconcile): a silent run is recovered only once its calls in flight are
past their deadline, so a second call is never made while the first may still be answered;
a stalled worker that wakes after that records its late answer as superseded, paid, and
leaves the job to the run that replaced it."""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal

import pytest
from django.db.models import Sum

from jobs.models import Attempt, Job, Workload
from tests.factories import submit
from tests.helpers import start_worker, stop, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

BEATS = {"AIQUEUE_HEARTBEAT_INTERVAL": "2", "AIQUEUE_STALE_RUNNING_AFTER": "4"}


@pytest.fixture
def triage(provider) -> Workload:
    return Workload.objects.create(
        name="Triage",
        kind=Workload.Kind.CLASSIFY,
        system_prompt="Classify the ticket.",
        labels=["billing", "bug", "other"],
        provider=provider,
        model="sim-small",
        max_output_tokens=5,
    )


def rq_workers(redis_conn) -> int:
    return redis_conn.scard("rq:workers")


def calls_in_flight(redis_conn, workload, user, simulator, tmp_path):
    """A worker (the one that will stall) with the calls of 3 jobs open at the simulator."""
    staller = start_worker(tmp_path, threads=5, **BEATS)
    try:
        wait_for(lambda: rq_workers(redis_conn) == 1, timeout=30)
        jobs = [submit(workload, user, f"ticket {i}") for i in range(3)]
        wait_for(lambda: simulator.counters()["in_flight"] == 3, timeout=30)
    except BaseException:
        stop(staller)
        raise
    return staller, jobs


def test_a_stall_shorter_than_the_stale_threshold_makes_no_second_call(
    redis_conn, triage, user, simulator, tmp_path
):
    simulator.control(latency_ms=14000)
    staller, jobs = calls_in_flight(redis_conn, triage, user, simulator, tmp_path)
    rescuer = None
    try:
        rescuer = start_worker(tmp_path, threads=5, **BEATS)
        wait_for(lambda: rq_workers(redis_conn) == 2, timeout=30)
        # Stop it just before its next beat, for less than the stale threshold (4 s): its
        # runs are silent for longer than that (1.9 s since the beat + 3.8 s), and the
        # reconciler sees them stale, but their calls may still be answered.
        beat = Job.objects.get(pk=jobs[0].pk).heartbeat_at
        wait_for(lambda: Job.objects.get(pk=jobs[0].pk).heartbeat_at != beat, timeout=10)
        time.sleep(1.9)
        os.kill(staller.pid, signal.SIGSTOP)
        time.sleep(3.8)
        os.kill(staller.pid, signal.SIGCONT)
        wait_for(
            lambda: (
                Job.objects.filter(pk__in=[j.pk for j in jobs], status="succeeded").count() == 3
            ),
            timeout=60,
        )
    finally:
        os.kill(staller.pid, signal.SIGCONT)
        stop(staller)
        if rescuer is not None:
            stop(rescuer)
    assert simulator.counters()["requests_total"] == 3
    assert Attempt.objects.filter(job__in=jobs).count() == 3
    assert not Job.objects.filter(
        pk__in=[j.pk for j in jobs], events__reason__startswith="worker lost"
    ).exists()


def test_a_stall_past_the_calls_deadline_supersedes_the_late_answer(
    redis_conn, triage, user, simulator, tmp_path
):
    # A call's deadline is connect + read timeout + 5 s: 1 + 3 + 5 = 9 s after it started.
    triage.provider.connect_timeout_s = 1
    triage.provider.read_timeout_s = 3
    triage.provider.save()
    simulator.control(latency_ms=1000)
    staller, jobs = calls_in_flight(redis_conn, triage, user, simulator, tmp_path)
    rescuer = None
    try:
        os.kill(staller.pid, signal.SIGSTOP)  # its calls are answered while it sleeps
        stalled_at = time.monotonic()
        rescuer = start_worker(tmp_path, threads=5, **BEATS)
        pks = [j.pk for j in jobs]
        wait_for(
            lambda: Job.objects.filter(pk__in=pks, status="succeeded").count() == 3, timeout=60
        )
        # Not before the calls' deadline, though the runs were stale after 4 s.
        assert time.monotonic() - stalled_at > 8
        os.kill(staller.pid, signal.SIGCONT)
        wait_for(
            lambda: Attempt.objects.filter(job__in=jobs, state="superseded").count() == 3,
            timeout=30,
        )
        time.sleep(2 * 2)  # two beats: the woken worker has let go of its runs
    finally:
        os.kill(staller.pid, signal.SIGCONT)
        stop(staller)
        if rescuer is not None:
            stop(rescuer)
    assert simulator.counters()["requests_total"] == 6
    for job in Job.objects.filter(pk__in=pks):
        assert job.status == "succeeded"
        assert job.events.filter(to_status="succeeded").count() == 1  # finished exactly once
        late = Attempt.objects.get(job=job, state="superseded")
        assert late.http_status == 200
        assert late.cost > 0
        assert not late.consumes_attempt
        used = Attempt.objects.get(job=job, state="settled")
        assert used.http_status == 200
        assert used.number > late.number
        # The ledger holds both calls, and the job's cost is their sum.
        total = Attempt.objects.filter(job=job).aggregate(s=Sum("cost"))["s"]
        assert job.cost_actual == total > Decimal(0)
        # The woken worker changed nothing on the job after it was recovered.
        recovered = job.events.get(reason__startswith="worker lost")
        after = job.events.filter(created_at__gt=recovered.created_at)
        assert [e.to_status for e in after] == ["running", "succeeded"]
