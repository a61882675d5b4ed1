"""A stopping worker (SIGTERM: a deploy, Ctrl-C of ./run) makes no new call: a run whose call
failed meanwhile is handed back instead of retried, and that call does not use up one of the
job's attempts. A real `manage.py worker` on the suite's Redis and database."""

from __future__ import annotations

import signal

import pytest

from jobs import services
from jobs.models import Attempt, Job
from runs import retries
from tests.helpers import start_worker, stop, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]


def test_a_call_failing_while_the_worker_stops_is_handed_back_not_retried(
    redis_conn, workload, user, simulator, tmp_path
):
    # Every call fails, slowly, with a retryable 503: a worker that kept retrying through its
    # grace period would use up the jobs' 3 attempts and send them to review.
    simulator.control(latency_ms=1500, error_rate=1.0, error_status=503)
    jobs = [
        services.do_submit_job(workload=workload, input_text=f"notes {i}", user=user)[0]
        for i in range(3)
    ]
    worker = start_worker(tmp_path, threads=3, grace=15)
    try:
        wait_for(lambda: simulator.counters()["in_flight"] == 3, timeout=30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        stop(worker)
    assert simulator.counters()["requests_total"] == 3  # no retry after the stop
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        assert job.status == "queued"
        assert job.events.filter(reason__startswith="handed back").exists()
        call = Attempt.objects.get(job=job)
        assert call.http_status == 503
        assert not call.consumes_attempt
        assert retries.attempts_used(job) == 0
