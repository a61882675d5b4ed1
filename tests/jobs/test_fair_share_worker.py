"""Fair share end to end: a real worker process against the simulator over HTTP, serving one
token's flood and another token's few jobs of the same priority."""

from __future__ import annotations

import sys

import pytest

from jobs.models import Job
from tests import factories
from tests.factories import submit
from tests.helpers import spawn, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)


def test_another_tokens_jobs_finish_long_before_a_flood_does(
    redis_conn, workload, user, other_user, simulator, tmp_path
):
    simulator.control(latency_ms=100)
    flooding = factories.make_api_token(user, "flood")
    other = factories.make_api_token(other_user, "few")
    flood = [submit(workload, user, f"flood {n}", api_token=flooding) for n in range(300)]
    few = [submit(workload, other_user, f"few {n}", api_token=other) for n in range(5)]
    env = worker_env(heartbeat=5, stale_after=20)
    worker = spawn(
        [sys.executable, "manage.py", "worker", "--threads", "10", "--no-scheduler"], tmp_path, env
    )
    few_jobs = Job.objects.filter(pk__in=[job.pk for job in few])
    try:
        wait_for(lambda: few_jobs.filter(status="succeeded").count() == len(few), timeout=120)
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    last_of_few = max(few_jobs.values_list("finished_at", flat=True))
    flood_done_first = Job.objects.filter(
        pk__in=[job.pk for job in flood], finished_at__lte=last_of_few
    ).count()
    # First in, first out the whole flood (300) finished before them; taking turns, about as
    # many of the flood's as theirs, plus the jobs already in the worker's threads.
    assert flood_done_first < 50
