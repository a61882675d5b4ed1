"""Review fixtures: jobs driven into review by the real runner against the simulator. The
reviewers, the reader and the workloads that escalate are in tests/conftest.py."""

from __future__ import annotations

import pytest

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
            assert job.status == Job.Status.NEEDS_REVIEW, (job.status, job.error)
            items.append(ReviewItem.objects.get(job=job, status=ReviewItem.Status.OPEN))
        return items

    return run
