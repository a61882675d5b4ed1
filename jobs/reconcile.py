"""The reconciler: make Redis agree with the database again.

The database is the source of truth; Redis can lose its data (restart without persistence,
flush, failover) and a worker can die mid-run. Each pass:

1. enqueues jobs whose row says queued but whose RQ entry is gone or finished;
2. recovers jobs stuck in running whose heartbeat stopped (their worker died): back to queued;
3. wakes waiting jobs whose resume time has passed but whose scheduled RQ entry is gone;
4. returns review items whose claim expired to the inbox's pool;
5. flow control (jobs.admission.housekeeping): expires jobs past their deadline, releases
   budget reservations of jobs that ended without settling, starts new budget periods and
   resumes held jobs that now fit.

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

from jobs import admission, queueing, services
from jobs.models import Job
from review import services as review_services

log = logging.getLogger(__name__)

LOCK_KEY = "aiqueue:reconcile:lock"
BATCH = 500


@dataclass
class Report:
    requeued: int = 0
    recovered: int = 0
    woken: int = 0
    claims_released: int = 0
    expired: int = 0
    reservations_released: int = 0
    unheld: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def run() -> Report:
    report = Report()
    now = timezone.now()
    _recover_stale_runs(report, now)
    _requeue_lost(report, now)
    _wake_overdue(report, now)
    report.claims_released = review_services.release_expired_claims(now)
    flow = admission.housekeeping(now)
    report.expired = flow.expired
    report.reservations_released = flow.reservations_released
    report.unheld = flow.unheld
    _admit_batches()
    if any(report.as_dict().values()):
        log.warning("reconciler: %s", report.as_dict())
    return report


def _admit_batches() -> None:
    """Running batches admit their next wave here too (a safety net for the wave refill that
    settling jobs trigger), and batches whose rows have all settled are marked completed."""
    from batches import services as batch_services  # batches depend on jobs, not the reverse

    try:
        batch_services.admit_running()
    except Exception:
        log.exception("reconciler: batch admission failed; the next pass will try again")


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
        Job.objects.filter(
            status__in=[Job.Status.WAITING, Job.Status.SCHEDULED], resume_at__lt=cutoff
        ).select_related("workload")[:BATCH]
    )
    try:
        missing = queueing.missing_rq_jobs(overdue)
    except redis.RedisError:
        return
    for job in _unchanged(missing):
        if services.do_resume_job(job, reason="woken by the reconciler: scheduled entry lost"):
            report.woken += 1


def _unchanged(jobs: list[Job]) -> list[Job]:
    """The jobs whose row is still in the park it was in when it was read.

    Between that read and the look in Redis a worker may have run the job and parked it
    again: its new entry is written only after RQ has deleted the old one
    (jobs.queueing._enqueue), so for that moment it looks lost, and waking it would cut its
    new wait short. Every park sets a new resume time, so an unchanged row means the entry
    really is gone.
    """
    if not jobs:
        return []
    current = {
        pk: (status, resume_at)
        for pk, status, resume_at in Job.objects.filter(pk__in=[job.pk for job in jobs])
        .order_by()
        .values_list("pk", "status", "resume_at")
    }
    return [job for job in jobs if current.get(job.pk) == (job.status, job.resume_at)]


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
