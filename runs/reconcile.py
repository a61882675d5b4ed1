"""The reconciler: make Redis agree with the database again.

The database is the source of truth; Redis can lose its data (restart without persistence,
flush, failover) and a worker can die mid-run. Each pass:

1. enqueues jobs whose row says queued but whose RQ entry is gone or finished;
2. recovers jobs stuck in running whose heartbeat stopped: back to queued, their calls in
   flight charged at their reservation (jobs.ledger). The stall rule: a silent run is
   recovered only once every call it has in flight is past its deadline (`Attempt.deadline_at`),
   so recovery never starts a second call while the first may still be answered; a run whose
   worker process is known dead (same host, jobs.processes) is recovered at once;
3. wakes waiting jobs whose resume time has passed but whose scheduled RQ entry is gone, and
   capacity waiters that are on no wait list (runs.capacity_waiters);
4. returns review items whose claim expired to the inbox's pool;
5. charges as unknown the calls left in flight past their deadline by runs that ended;
6. flow control (runs.admission.housekeeping): expires jobs past their deadline, releases
   budget reservations of jobs that ended without settling, starts new budget periods and
   resumes held jobs that now fit;
7. enqueues again the webhook deliveries whose pending attempt Redis lost (jobs.webhooks).

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

from batches import services as batch_services
from jobs import fairshare, ledger, processes, queueing, services, webhooks
from jobs.models import Job
from review import services as review_services
from runs import admission, capacity_waiters

log = logging.getLogger(__name__)

LOCK_KEY = "aiqueue:reconcile:lock"
# RQ's scheduler polls every second and queueing.enqueue_at rounds up to the next whole second:
# a scheduled entry this late is not being served.
SCHEDULE_LATE_S = 10
# How many of the oldest queued jobs of each priority, and of each lane of a priority, a pass
# looks for on their queue.
SEARCH_QUEUE_HEAD = 50
SEARCH_LANE_HEAD = 5
BATCH = 500


@dataclass
class Report:
    requeued: int = 0
    recovered: int = 0
    calls_lost: int = 0
    woken: int = 0
    claims_released: int = 0
    expired: int = 0
    reservations_released: int = 0
    unheld: int = 0
    webhooks_requeued: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def run() -> Report:
    report = Report()
    now = timezone.now()
    _recover_stale_runs(report, now)
    report.calls_lost = ledger.sweep(now)
    _requeue_lost(report, now)
    _wake_overdue(report, now)
    report.woken += capacity_waiters.wake_unlisted()
    report.claims_released = review_services.release_expired_claims(now)
    flow = admission.housekeeping(now)
    report.expired = flow.expired
    report.reservations_released = flow.reservations_released
    report.unheld = flow.unheld
    _admit_batches()
    report.webhooks_requeued = webhooks.requeue_lost(now)
    if any(report.as_dict().values()):
        log.warning("reconciler: %s", report.as_dict())
    return report


def _admit_batches() -> None:
    """Running batches admit their next wave here too (a safety net for the wave refill that
    settling jobs trigger), and batches whose rows have all settled are marked completed."""
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
        if processes.is_dead(job.run_by):
            if _recover(job, DEAD):
                report.recovered += 1
            continue
        open_until = ledger.open_until(job)
        if open_until is not None and open_until > now:
            # Silent, but its call may still be answered (a stalled worker wakes and reads it):
            # a second call now could be paid twice. Its deadline bounds the wait.
            log.info(
                "job=%s silent since %s; its call in flight ends by %s: recovered after",
                job.code,
                job.heartbeat_at,
                open_until,
            )
            continue
        if _recover(job, SILENT):
            report.recovered += 1


# Why a run was recovered (audit reason), and what became of its calls in flight (ledger).
DEAD = ("worker lost: its process is gone", "its worker died")
SILENT = ("worker lost: heartbeat stopped", "its worker went silent past the call's deadline")


def _recover(job: Job, why: tuple[str, str]) -> bool:
    reason, lost_calls = why
    return services.do_recover_stale_run(job, reason=reason, lost_calls=lost_calls)


def recover_dead_local() -> int:
    """Recover at once the runs of worker processes of this host that no longer exist
    (killed, crashed), without waiting for their heartbeats to go stale. Every worker runs it
    at start and in its maintenance pass: a worker restarted by the process manager brings
    its predecessor's runs back within seconds. Returns how many runs were recovered."""
    me = processes.identity()
    running = (
        Job.objects.filter(status=Job.Status.RUNNING, run_by__startswith=processes.host_prefix())
        .exclude(run_by=me)
        .select_related("workload")
    )
    dead: dict[str, bool] = {}
    recovered = 0
    for job in running.iterator(chunk_size=BATCH):
        if job.run_by not in dead:
            dead[job.run_by] = processes.is_dead(job.run_by)
        if dead[job.run_by] and _recover(job, DEAD):
            recovered += 1
    if recovered:
        log.warning("reconciler: recovered %d run(s) of dead workers on this host", recovered)
    return recovered


def _requeue_lost(report: Report, now) -> None:
    cutoff = now - timedelta(seconds=settings.AIQUEUE_ENQUEUE_GRACE)
    candidates = Job.objects.filter(status=Job.Status.QUEUED, queued_at__lt=cutoff).select_related(
        "workload"
    )
    batch: list[Job] = []
    # The oldest few of each priority are looked for on their queue (queueing.missing_rq_jobs):
    # an entry a dead worker popped and never started was at the head of it. With fair share
    # the head holds the oldest of each lane, not of the priority (jobs.fairshare), so
    # the oldest few of each lane are looked for too.
    per_priority: dict[str, int] = {}
    per_lane: dict[tuple[str, str], int] = {}
    search: set[int] = set()
    for job in candidates.order_by("queued_at").iterator(chunk_size=BATCH):
        batch.append(job)
        lane = (job.priority, fairshare.lane_of(job))
        if per_priority.get(job.priority, 0) < SEARCH_QUEUE_HEAD:
            per_priority[job.priority] = per_priority.get(job.priority, 0) + 1
            search.add(job.pk)
        if per_lane.get(lane, 0) < SEARCH_LANE_HEAD:
            per_lane[lane] = per_lane.get(lane, 0) + 1
            search.add(job.pk)
        if len(batch) >= BATCH:
            report.requeued += _requeue(batch, search)
            batch = []
    report.requeued += _requeue(batch, search)


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
    # An entry still in RQ's schedule long after its time is not being served: the worker
    # whose scheduler held the lock died, and the lock outlives it by a minute (RQ's lock
    # TTL), or the scheduler process itself died. The job is woken here instead; should the
    # scheduler move the entry after all, the second queue entry finds the job started and
    # returns (runs.runner).
    late = now - timedelta(seconds=SCHEDULE_LATE_S)
    unserved = [job for job in overdue if job not in missing and job.resume_at < late]
    for job in _unchanged(unserved):
        if services.do_resume_job(
            job, reason="woken by the reconciler: RQ's scheduler did not move it in time"
        ):
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


def _requeue(batch: list[Job], search: set[int]) -> int:
    try:
        missing = queueing.missing_rq_jobs(batch, search=search)
    except redis.RedisError as exc:
        log.warning("reconciler: Redis unavailable, will try again: %s", exc)
        return 0
    count = 0
    for job in missing:
        # A dead worker's execution of the old entry, if any, goes first (queueing).
        if queueing.enqueue_recovered(job):
            count += 1
    return count
