"""Admission: may this queued job run now? Decided right before the run starts.

`admit()` either returns a Lease (the job may start; the runner holds the lease for the run and
passes it back to `finish()` in `finally`) or parks/expires the job and returns None. A job
that cannot run yet never holds a worker: it is parked (`services.do_park_job`) with a reason
and a wake-up time, and woken earlier when capacity frees.

In order:
1. deadline passed → expired (it never calls the provider);
2. a requested start time in the future → scheduled until then;
3. workload paused → waiting ("workload paused"), woken when an operator resumes it;
   its provider out of credit → held until an operator clears it (jobs.credit);
4. deferrable workload outside the off-peak window and the queue not quiet → scheduled until
   the window opens;
5. concurrency caps (provider, workload) → a lease, or waiting on the resource's wait list;
6. rate limits (provider rpm, tpm) → charged, or waiting until the exact time GCRA allows.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from jobs import credit, kinds, queueing, services
from jobs.flow import budgets, leases, rate_limits
from jobs.models import Job, Workload
from jobs.services import PAUSED_REASON
from runs import retries

log = logging.getLogger(__name__)

WAKE_ATTEMPTS = 20


def admit(job: Job) -> leases.Lease | None:
    now = timezone.now()
    workload: Workload = job.workload
    if job.is_past_deadline(now):
        expire_overdue(job)
        return None
    if job.scheduled_for and job.scheduled_for > now:
        _park(
            job,
            f"scheduled to start at {services.local_time(job.scheduled_for)}",
            job.scheduled_for,
            kind=Job.WaitKind.SCHEDULED,
            status=Job.Status.SCHEDULED,
        )
        return None
    if workload.is_paused:
        _park(job, PAUSED_REASON, now + _recheck(), kind=Job.WaitKind.PAUSED)
        return None
    provider = budgets.chosen_target(workload, job.overrides)[0]
    if credit.is_out_of_credit(provider):
        credit.hold_at_admission(job, provider)
        return None
    run_now = (job.overrides or {}).get(services.RUN_NOW)  # an operator said so: not deferred
    if workload.is_deferrable and not run_now and not may_run_deferrable(now, job):
        start = next_offpeak_start(now)
        _park(
            job,
            f"deferred to the off-peak window (from {timezone.localtime(start):%H:%M})",
            start,
            kind=Job.WaitKind.OFF_PEAK,
            status=Job.Status.SCHEDULED,
        )
        return None

    resources = leases.resources_for(workload)
    got = leases.acquire(job, resources)
    if isinstance(got, leases.Refused):
        parked = _park(job, got.reason, now + _recheck(), kind=Job.WaitKind.CAPACITY)
        if parked and leases.in_use(got.resource) < got.limit:
            # A slot freed between our refusal and the park, and its release found nobody
            # parked yet to wake: wake ourselves rather than wait for the fallback.
            _wake_one(got.resource, str(job.code))
        return None

    decision = rate_limits.acquire(workload.provider, _token_cost(job))
    if not decision.allowed:
        finish(job, got, ran=False)
        _park(
            job,
            decision.reason,
            now + timedelta(seconds=decision.wait_s),
            kind=Job.WaitKind.RATE_LIMIT,
        )
        return None
    return got


def expire_overdue(job: Job) -> bool:
    """A job not running at its deadline expires; if it was waiting for a failing provider,
    it says so (runs.retries.expiry_for)."""
    expiry = retries.expiry_for(job, default="deadline passed before the job could start")
    return services.do_expire_job(job, reason=expiry.reason, error=expiry.error)


def finish(job: Job, lease: leases.Lease | None, *, ran: bool) -> None:
    """After a run (in `finally`): free the slots and wake the next waiters; if the job can no
    longer spend, give back the rest of its budget reservation."""
    try:
        if lease is not None and lease.resources:
            woken = leases.release(lease)
            for resource, code in zip(lease.resources, woken, strict=False):
                if code:
                    _wake_one(resource, code)
    finally:
        # `cost_reserved` was read when the run began; reservations are made only at submit
        # and on release from hold, never during a run: zero means there is nothing to give.
        if ran and job.cost_reserved:
            status = Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()
            if status not in budgets.ACTIVE_STATUSES and services.release_budget(job):
                # Pages heard of the job's end before its reservation was given back.
                services.publish_on_commit(job)


def _wake_one(resource: leases.Resource, code: str | None) -> None:
    """Resume the first waiter that still wants to run (skipping cancelled ones)."""
    for _ in range(WAKE_ATTEMPTS):
        if not code:
            return
        job = Job.objects.select_related("workload").filter(code=code).first()
        if job is not None and job.status == Job.Status.WAITING:
            # Drop its fallback wake-up first, so the RQ id is not queued twice.
            queueing.remove(job)
            if services.do_resume_job(job, reason=f"capacity freed on {resource.label}"):
                return
        # Cancelled, finished, already back in the queue, or about to park (a parking job
        # checks for room itself right after parking): the next waiter gets the slot.
        code = leases.pop_waiter(resource)


def _park(
    job: Job, reason: str, resume_at: datetime, *, kind: str, status: str = Job.Status.WAITING
) -> bool:
    if job.deadline and resume_at > job.deadline:
        # Wake at the deadline, so the job expires on time instead of sleeping past it.
        resume_at = job.deadline
    return services.do_park_job(job, reason=reason, resume_at=resume_at, kind=kind, status=status)


def _recheck() -> timedelta:
    """The fallback wake-up of a capacity waiter; jittered so waiters do not wake together."""
    base = settings.AIQUEUE_CAPACITY_RECHECK
    return timedelta(seconds=base * random.uniform(0.8, 1.2))


def _token_cost(job: Job) -> int:
    # The same upper bound the budgets reserve (jobs.costs): tpm is charged in real tokens.
    workload = job.workload
    tokens_in = budgets.estimate_input_tokens(workload, kinds.prompt_values(job), job.overrides)
    return tokens_in + workload.max_output_tokens


# --- deferrable work ------------------------------------------------------------------------


def in_offpeak_window(now: datetime) -> bool:
    start, end = settings.AIQUEUE_OFFPEAK_START, settings.AIQUEUE_OFFPEAK_END
    hour = timezone.localtime(now).hour
    if start == end:
        return True
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end  # the window spans midnight


def next_offpeak_start(now: datetime) -> datetime:
    local = timezone.localtime(now)
    start = local.replace(hour=settings.AIQUEUE_OFFPEAK_START, minute=0, second=0, microsecond=0)
    if start <= local:
        start += timedelta(days=1)
    return start


def queue_depth(exclude: Job | None = None) -> int:
    """The backlog: jobs queued or parked waiting to run (capacity, rate limits, backoff). The
    database counts the parked ones, which are in no Redis list: counting the lists only
    let deferrable jobs run at once during a 20-job backlog."""
    backlog = Job.objects.filter(status__in=[Job.Status.QUEUED, Job.Status.WAITING])
    if exclude is not None:
        backlog = backlog.exclude(pk=exclude.pk)
    return backlog.count()


def may_run_deferrable(now: datetime, job: Job | None = None) -> bool:
    """Inside the off-peak window, or while the backlog (but `job`) is below the threshold."""
    if in_offpeak_window(now):
        return True
    threshold = settings.AIQUEUE_DEFER_QUEUE_BELOW
    return threshold > 0 and queue_depth(exclude=job) < threshold


# --- pause / resume -------------------------------------------------------------------------


# --- reconciler -----------------------------------------------------------------------------


@dataclass
class Housekeeping:
    expired: int = 0
    reservations_released: int = 0
    unheld: int = 0


def housekeeping(now: datetime) -> Housekeeping:
    """The flow-control part of a reconciler pass (runs.reconcile)."""
    done = Housekeeping()
    overdue = Job.objects.filter(
        status__in=[Job.Status.QUEUED, Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED],
        deadline__lte=now,
    ).select_related("workload")
    for job in overdue[:500]:
        if expire_overdue(job):
            done.expired += 1
    done.reservations_released = budgets.release_leaked()
    budgets.roll_periods(now)
    if Job.objects.filter(status=Job.Status.HELD).exists():
        done.unheld = services.do_release_held()
    return done
