"""A job replayed while it waits for review leaves the inbox as retried (review.receivers)."""

from __future__ import annotations

import pytest

from jobs import services
from review.models import ReviewItem

pytestmark = pytest.mark.django_db(transaction=True)


def test_replaying_a_job_in_review_closes_its_item_as_retried(
    redis_conn, classify_workload, escalate, operator
):
    (item,) = escalate(classify_workload, "Cheap pills here [[low-confidence]]")
    services.do_replay_job(item.job, actor=operator)
    item.refresh_from_db()
    assert item.status == ReviewItem.Status.RESOLVED
    assert item.resolution == ReviewItem.Resolution.RETRIED
    assert item.resolved_by == operator
    item.job.refresh_from_db()
    assert item.job.status == "queued"
