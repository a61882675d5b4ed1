"""Review fixtures: jobs driven into review by the real runner against the simulator. The
reviewers, the reader and the workloads that escalate are in tests/conftest.py."""

from __future__ import annotations

import pytest

from jobs import queueing
from jobs.models import Job, Workload
from review.models import ReviewItem
from tests.factories import submit


@pytest.fixture
def escalate(run_worker, user):
    """Submit jobs and run the real worker until the queues are empty; return their items."""

    def run(workload: Workload, *texts: str) -> list[ReviewItem]:
        jobs = [submit(workload, user, text) for text in texts]
        run_worker()
        items = []
        for job in jobs:
            job.refresh_from_db()
            assert job.status == Job.Status.NEEDS_REVIEW, repr(where_is(job))
            items.append(ReviewItem.objects.get(job=job, status=ReviewItem.Status.OPEN))
        return items

    return run


def where_is(job: Job) -> dict:
    """What a job that did not reach review left behind: its row, its history and what Redis
    holds of it (a flake seen under load left it queued after the burst worker)."""
    rq_queue = queueing.queue(job.priority)
    return {
        "status": job.status,
        "error": job.error,
        "events": list(job.events.values_list("from_status", "to_status", "reason")),
        "rq_queued": rq_queue.get_job_ids(),
        "rq_scheduled": rq_queue.scheduled_job_registry.get_job_ids(),
        "rq_entry": rq_queue.fetch_job(job.rq_job_id) is not None,
    }
