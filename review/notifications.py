"""Tell reviewers that items arrived, one email per burst.

The first escalation in a window SETs a Redis key with NX and an expiry of the window, and
only that caller schedules `review.tasks.send_digest` with RQ's `enqueue_in` (under an id
derived from the window, so two processes racing past a lost key still schedule one). Every
later escalation in the window finds the key and does nothing: the digest sends whatever
items have not been announced yet (`ReviewItem.notified_at` is NULL), so the database, not
Redis, decides what goes in it.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import redis
from django.conf import settings

from jobs import queueing

log = logging.getLogger(__name__)

WINDOW_KEY = "aiqueue:review:digest-window"
DIGEST_TASK = "review.tasks.send_digest"
DIGEST_QUEUE = "default"


def window_seconds() -> int:
    return settings.AIQUEUE_REVIEW_DIGEST_SECONDS


def digest_job_id(now: float | None = None) -> str:
    window = window_seconds()
    return f"review-digest-{int((now or time.time()) // window)}"


def item_arrived() -> bool:
    """Schedule a digest unless one is already due in this window. Returns whether it did."""
    window = window_seconds()
    try:
        connection = queueing.connection()
        if not connection.set(WINDOW_KEY, "1", nx=True, ex=window):
            return False
        queueing.queue(DIGEST_QUEUE).enqueue_in(
            timedelta(seconds=window),
            DIGEST_TASK,
            job_id=digest_job_id(),
            result_ttl=0,
            failure_ttl=24 * 3600,
            description="review inbox digest",
        )
    except redis.RedisError as exc:
        # Best effort: the items are safe in the database and visible in the inbox; the next
        # escalation (or the reconciler) schedules a digest that includes them.
        log.warning("could not schedule the review digest: %s", exc)
        return False
    return True
