"""What the review inbox does when the jobs app tells it something (jobs.replay.job_replayed)."""

from __future__ import annotations

from django.dispatch import receiver
from django.utils import timezone

from jobs import live
from jobs.replay import job_replayed
from review.models import ReviewItem


@receiver(job_replayed, dispatch_uid="review-close-items-of-replayed-job")
def close_items_of_replayed_job(sender, *, job, actor, **kwargs) -> None:
    """A job replayed while it waited for review was retried, by whoever replayed it: its open
    items close as retried in the replay's transaction, and the inbox drops them."""
    closed = ReviewItem.objects.filter(job_id=job.pk, status=ReviewItem.Status.OPEN).update(
        status=ReviewItem.Status.RESOLVED,
        resolution=ReviewItem.Resolution.RETRIED,
        resolved_by=actor if actor is not None and actor.is_authenticated else None,
        resolved_at=timezone.now(),
        claim_expires_at=None,
        note="replayed from outside the inbox",
    )
    if closed:
        live.stale_on_commit(live.REVIEW_GROUP)  # open inbox pages re-fetch their table
