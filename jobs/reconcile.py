"""The reconciler: make Redis agree with the database again.

The database is the source of truth; Redis can lose its data (restart without persistence,
flush, failover) and a worker can die mid-run. Each pass:

1. enqueues jobs whose row says queued but whose RQ entry is gone or finished;
2. recovers jobs stuck in running whose heartbeat stopped (their worker died): back to queued;
3. wakes waiting jobs whose resume time has passed but whose scheduled RQ entry is gone.

It is idempotent and safe to run from several processes at once: recovery is a
compare-and-set on the row, and an enqueue of a job that is already queued only overwrites its
entry. Workers run it in their maintenance pass under a Redis lock, so normally one does.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import timedelta

import redis
from django.conf import settings
from django.utils import timezone

from jobs import queueing, services
from jobs.models import Job

log = logging.getLogger(__name__)

LOCK_KEY = "aiqueue:reconcile:lock"
BATCH = 500


@dataclass
class Report:
    requeued: int = 0
    recovered: int = 0
    woken: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def run() -> Report:
    report = Report()
    now = timezone.now()
    _recover_stale_runs(report, now)
    _requeue_lost(report, now)
    _wake_overdue(report, now)
    if any(report.as_dict().values()):
        log.warning("reconciler: %s", report.as_dict())
    return report


def run_if_due(interval_s: int) -> Report | None:
    """Run once per interval across all workers (the lock expires by itself)."""
    try:
        got = queueing.connection().set(LOCK_KEY, "1", nx=True, ex=max(1, interval_s))
    except redis.RedisError:
        return None
    return run() if got else None


def _recover_stale_runs(report: Report, now) -> None:
    cutoff = now - timedelta(seconds=settings.AIQUEUE_STALE_RUNNING_AFTER)
    stale = Job.objects.filter(status=Job.Status.RUNNING, heartbeat_at__lt=cutoff).select_related(
        "workload"
    )
    for job in stale.iterator(chunk_size=BATCH):
        if services.do_recover_stale_run(job, reason="worker lost: heartbeat stopped"):
            report.recovered += 1


def _requeue_lost(report: Report, now) -> None:
    cutoff = now - timedelta(seconds=settings.AIQUEUE_ENQUEUE_GRACE)
    candidates = Job.objects.filter(status=Job.Status.QUEUED, queued_at__lt=cutoff).select_related(
        "workload"
    )
    batch: list[Job] = []
    for job in candidates.order_by("queued_at").iterator(chunk_size=BATCH):
        batch.append(job)
        if len(batch) >= BATCH:
            report.requeued += _requeue(batch)
            batch = []
    report.requeued += _requeue(batch)


def _wake_overdue(report: Report, now) -> None:
    cutoff = now - timedelta(seconds=settings.AIQUEUE_ENQUEUE_GRACE)
    overdue = list(
        Job.objects.filter(status=Job.Status.WAITING, resume_at__lt=cutoff).select_related(
            "workload"
        )[:BATCH]
    )
    try:
        missing = queueing.missing_rq_jobs(overdue)
    except redis.RedisError:
        return
    for job in missing:
        if services.do_resume_job(job, reason="woken by the reconciler: scheduled entry lost"):
            report.woken += 1


def _requeue(batch: list[Job]) -> int:
    try:
        missing = queueing.missing_rq_jobs(batch)
    except redis.RedisError as exc:
        log.warning("reconciler: Redis unavailable, will try again: %s", exc)
        return 0
    count = 0
    for job in missing:
        if queueing.enqueue(job):
            count += 1
    return count
