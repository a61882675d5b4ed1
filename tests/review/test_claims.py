"""Claims: atomic, expiring, released by the reconciler, respected by actions."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from review import services
from review.models import ReviewItem
from runs import reconcile

pytestmark = pytest.mark.django_db(transaction=True)

LOW = "Cheap pills here [[low-confidence]]"


def test_two_reviewers_claiming_at_once_exactly_one_wins(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer
):
    (item,) = escalate(classify_workload, LOW)
    barrier = threading.Barrier(2)
    results: dict[str, bool] = {}

    def claim(user) -> None:
        try:
            fresh = ReviewItem.objects.get(pk=item.pk)
            barrier.wait(timeout=10)
            results[user.username] = services.do_claim(fresh, user)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(u,)) for u in (reviewer, second_reviewer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(results.values()) == [False, True]
    winner = next(name for name, won in results.items() if won)
    item.refresh_from_db()
    assert item.claimed_by.username == winner
    assert item.job.events.filter(reason="claimed for review").count() == 1


def test_claim_held_by_another_reviewer_blocks_claims_and_actions(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer
):
    (item,) = escalate(classify_workload, LOW)
    assert services.do_claim(item, reviewer)
    assert not services.do_claim(item, second_reviewer)
    with pytest.raises(services.ReviewError, match="rita is working on this item"):
        services.do_approve(item, second_reviewer)
    item.job.refresh_from_db()
    assert item.job.status == "needs_review"


def test_expired_claim_can_be_taken_by_someone_else(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer
):
    (item,) = escalate(classify_workload, LOW)
    services.do_claim(item, reviewer)
    ReviewItem.objects.filter(pk=item.pk).update(
        claim_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert services.do_claim(item, second_reviewer)
    item.refresh_from_db()
    assert item.claimed_by == second_reviewer


def test_claim_lasts_the_configured_minutes(
    redis_conn, classify_workload, escalate, reviewer, settings
):
    settings.AIQUEUE_REVIEW_CLAIM_MINUTES = 3
    (item,) = escalate(classify_workload, LOW)
    services.do_claim(item, reviewer)
    item.refresh_from_db()
    assert item.claim_expires_at - item.claimed_at == timedelta(minutes=3)


def test_reconciler_releases_expired_claims_and_keeps_live_ones(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer
):
    stale, live = escalate(classify_workload, LOW, "Another one [[low-confidence]]")
    services.do_claim(stale, reviewer)
    services.do_claim(live, second_reviewer)
    ReviewItem.objects.filter(pk=stale.pk).update(
        claim_expires_at=timezone.now() - timedelta(minutes=1)
    )

    report = reconcile.run()

    assert report.claims_released == 1
    stale.refresh_from_db()
    live.refresh_from_db()
    assert stale.claimed_by is None
    assert stale.claim_expires_at is None
    assert live.claimed_by == second_reviewer
    assert stale.job.events.filter(reason="review claim of rita expired").exists()


def test_releasing_own_claim_returns_the_item_to_the_pool(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer
):
    (item,) = escalate(classify_workload, LOW)
    services.do_claim(item, reviewer)
    assert not services.do_release(item, second_reviewer)
    assert services.do_release(item, reviewer)
    assert services.do_claim(item, second_reviewer)
