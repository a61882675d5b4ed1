"""Webhooks: a signed POST to an operator's address when a job ends or goes to review, a
batch ends, or a budget reaches its alert threshold (jobs.budget_alerts). Each event is a
WebhookDelivery row (the log), delivered by an RQ job on its own queue (QUEUE, served by
`manage.py webhook_worker`), never in a worker's job thread: a slow or dead receiver delays
nobody's run. A failed attempt is retried after AIQUEUE_WEBHOOK_RETRY_DELAYS (backoff with
jitter); after the last it is left failed, and the admin can deliver it again.

Signature: header `Aiqueue-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
keyed by the webhook's secret, made afresh for each attempt. A receiver recomputes it, compares
in constant time and refuses an old `t` (docs/deploy.md has the snippet). `Aiqueue-Delivery`
names the delivery: the same event retried carries the same one, for receivers to de-duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import httpx
import rq
import rq.job
from django.conf import settings
from django.db import models
from django.dispatch import receiver
from django.utils import timezone

from jobs import queueing
from jobs.models import Job, Webhook, WebhookDelivery
from jobs.representations import job_json
from jobs.signals import job_settled, job_stopped

log = logging.getLogger(__name__)

QUEUE = "aiqueue-webhooks"
SIGNATURE_HEADER = "Aiqueue-Signature"
# The statuses a job's webhooks hear of, as event names.
JOB_EVENTS = {
    Job.Status.SUCCEEDED: "job.succeeded",
    Job.Status.FAILED: "job.failed",
    Job.Status.CANCELLED: "job.cancelled",
    Job.Status.EXPIRED: "job.expired",
    Job.Status.NEEDS_REVIEW: "job.needs_review",
}
# Active webhooks are read once per this many seconds per process: a job's end costs no query
# while none is set (the common case), and a new webhook hears of events within this time.
CACHE_SECONDS = 5.0
TIMEOUT = httpx.Timeout(10.0, connect=5.0)

_cache: tuple[float, list[Webhook]] | None = None
_cache_lock = threading.Lock()


def active_webhooks() -> list[Webhook]:
    global _cache
    with _cache_lock:
        if _cache is None or time.monotonic() - _cache[0] > CACHE_SECONDS:
            _cache = (time.monotonic(), list(Webhook.objects.filter(is_active=True)))
        return _cache[1]


def forget_cache() -> None:
    global _cache
    with _cache_lock:
        _cache = None


def following(user_id: int | None, workload_id: int) -> list[Webhook]:
    """The active webhooks that hear of the jobs and batches of this user and workload."""
    return [
        hook
        for hook in active_webhooks()
        if hook.user_id in (None, user_id) and hook.workload_id in (None, workload_id)
    ]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def job_event(job: Job, status: str) -> None:
    """`job` has just moved to `status` (committed): tell the webhooks that follow it. Called
    once per transition, on commit, by the receiver of jobs.signals below. Never raises: a webhook's
    trouble must not reach the run that ended the job."""
    event = JOB_EVENTS.get(status)
    if event is None:
        return
    try:
        hooks = following(job.submitted_by_id, job.workload_id)
        if not hooks:
            return
        fresh = Job.objects.select_related("workload", "batch", "replay_of").get(pk=job.pk)
        data = {"job": job_json(fresh, settings.AIQUEUE_BASE_URL.rstrip("/"))}
        record(hooks, event, data, job=fresh)
    except Exception:
        log.exception("webhooks: could not record %s for job %s", event, job.code)


def batch_event(batch, event: str, batch_data: Callable[[], dict]) -> None:
    """A batch ended (`event` "batch.completed" or "batch.cancelled"): like job_event.
    `batch_data` builds its JSON (batches.api.batch_json), only if a webhook follows it."""
    try:
        if hooks := following(batch.created_by_id, batch.workload_id):
            record(hooks, event, {"batch": batch_data()}, batch=batch)
    except Exception:
        log.exception("webhooks: could not record %s for batch %s", event, batch.code)


def record(hooks: list[Webhook], event: str, data: dict, **about) -> None:
    """One delivery row per webhook (the log: recorded even if Redis is away), then enqueued."""
    for hook in hooks:
        delivery = WebhookDelivery(webhook=hook, event=event, **about)
        body = {
            "id": str(delivery.code),
            "event": event,
            "created_at": delivery.created_at.isoformat(),
            **data,
        }
        delivery.body = json.dumps(body, separators=(",", ":"))
        delivery.save()
        enqueue(delivery)


def queue() -> rq.Queue:
    return rq.Queue(QUEUE, connection=queueing.connection())


def _rq_id(delivery: WebhookDelivery) -> str:
    return f"webhook-{delivery.code}-{delivery.attempts}"


def enqueue(delivery: WebhookDelivery, delay: float = 0) -> None:
    """Put the delivery's next attempt on the webhook queue, now or after `delay` seconds (RQ's
    scheduler, run by the webhook worker, moves it to the queue then)."""
    job_id = _rq_id(delivery)
    if delay <= 0:
        queue().enqueue(deliver, delivery.pk, job_id=job_id, result_ttl=0, failure_ttl=86400)
    else:
        queue().enqueue_in(
            timedelta(seconds=delay),
            deliver,
            delivery.pk,
            job_id=job_id,
            result_ttl=0,
            failure_ttl=86400,
        )


def retry_delays() -> list[int]:
    return settings.AIQUEUE_WEBHOOK_RETRY_DELAYS


def deliver(delivery_id: int) -> str:
    """The RQ task: one attempt. Returns the delivery's status after it."""
    delivery = WebhookDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None or delivery.status != WebhookDelivery.Status.PENDING:
        return delivery.status if delivery else "gone"
    hook = delivery.webhook
    if not hook.is_active:
        return delivery.status
    body = delivery.body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "aiqueue-webhooks",
        "Aiqueue-Event": delivery.event,
        "Aiqueue-Delivery": str(delivery.code),
        SIGNATURE_HEADER: sign(hook.secret, int(time.time()), body),
    }
    started = time.monotonic()
    status_code, error = None, ""
    try:
        response = httpx.post(
            hook.url, content=body, headers=headers, timeout=TIMEOUT, follow_redirects=False
        )
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    now = timezone.now()
    delivery.attempts += 1
    delivery.last_status_code = status_code
    delivery.last_error = error
    delivery.log = [
        *delivery.log,
        {
            "at": now.isoformat(),
            "status_code": status_code,
            "error": error,
            "ms": round((time.monotonic() - started) * 1000),
        },
    ]
    delays = retry_delays()
    delay = None
    if not error:
        delivery.status = WebhookDelivery.Status.DELIVERED
        delivery.delivered_at, delivery.next_attempt_at = now, None
    elif delivery.attempts <= len(delays):
        base = delays[delivery.attempts - 1]
        delay = base * random.uniform(0.8, 1.2)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
    else:
        delivery.status, delivery.next_attempt_at = WebhookDelivery.Status.FAILED, None
        log.warning(
            "webhook %s: gave up on %s after %d attempts", hook, delivery.code, delivery.attempts
        )
    delivery.save(
        update_fields=[
            "attempts",
            "last_status_code",
            "last_error",
            "log",
            "status",
            "delivered_at",
            "next_attempt_at",
        ]
    )
    if delay is not None:
        enqueue(delivery, delay)
    return delivery.status


# A pending attempt whose time is this far past and which Redis does not hold (queued,
# scheduled or running) was lost: Redis restarted or was wiped, or the process that recorded
# it died between the row and the enqueue. Longer than a delivery's own timeout, so an attempt
# a worker is making now is never doubled.
LOST_AFTER_S = 60
SWEEP_BATCH = 500


def requeue_lost(now=None) -> int:
    """The reconciler's pass for webhooks: enqueue again every pending delivery whose attempt
    Redis lost. A receiver may then see an attempt twice (the first got through but its
    worker died before recording it): deliveries are at least once, and each carries its
    `Aiqueue-Delivery` id for the receiver to drop repeats (docs/deploy.md)."""
    now = now or timezone.now()
    late = now - timedelta(seconds=LOST_AFTER_S)
    pending = (
        WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING)
        .filter(
            models.Q(next_attempt_at__lt=late)
            | models.Q(next_attempt_at__isnull=True, created_at__lt=late)
        )
        .filter(webhook__is_active=True)
        .order_by("created_at")[:SWEEP_BATCH]
    )
    pending = list(pending)
    if not pending:
        return 0
    with queueing.connection().pipeline(transaction=False) as pipe:
        for delivery in pending:
            pipe.hget(rq.job.Job.key_for(_rq_id(delivery)), "status")
        statuses = pipe.execute()
    requeued = 0
    for delivery, status in zip(pending, statuses, strict=True):
        if (status.decode() if status else None) in queueing.LIVE_RQ_STATES:
            continue
        enqueue(delivery)
        requeued += 1
    return requeued


def redeliver(delivery: WebhookDelivery) -> None:
    """The admin's "deliver again": pending once more, attempted now (its log goes on)."""
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        status=WebhookDelivery.Status.PENDING, next_attempt_at=None
    )
    delivery.refresh_from_db()
    enqueue(delivery)


@receiver(job_settled, dispatch_uid="webhooks-job-settled")
@receiver(job_stopped, dispatch_uid="webhooks-job-stopped")
def _job_ended(sender, job: Job, status: str, **kwargs) -> None:
    """A job's end (succeeded, failed, cancelled, expired) or its move to review."""
    job_event(job, status)
