"""The write-ahead cost ledger: one Attempt row per provider call, written before the call.

A provider bills a call once the request has reached it, whether or not the caller lives to
read the answer. So the row is committed `in_flight`, with the call's worst-case cost
(`reserved_cost`) and the moment by which the call is over whatever happens (`deadline_at`),
before the request leaves the process, and settled after (`settle`):

- `in_flight → settled`: the worker that made the call recorded its end (usage, cost);
- `in_flight → unknown`: its worker died, stalled past the call's deadline, or stopped before
  the call ended (`lose`, by the reconciler or the stopping worker): charged at
  `reserved_cost`, as the provider may have billed the whole call;
- `unknown → superseded`: the stalled worker woke and read its answer after all: the row takes
  the real usage (the charge is corrected to it), and the answer is not used, as the job was
  recovered and runs again.

Every state change is a compare-and-set on the row, so the worker and the reconciler cannot
both settle one call; the one that wins moves the money (`_charge`: the job's `cost_actual`
and every budget's spent). So the ledger, and every budget, is never below what the provider
billed: a crash costs at most the worst case of the calls it cut off, and shows as such.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import F, Max
from django.utils import timezone

from jobs.flow import budgets
from jobs.models import Attempt, Job, Provider

log = logging.getLogger(__name__)

# On top of connect + read timeout: a live worker has settled its call by then.
DEADLINE_MARGIN_S = 5.0
UNKNOWN_ERROR_CLASS = "outcome_unknown"
UNKNOWN_REASON = "outcome unknown: charged as reserved"

# What the worker writes when it settles a call.
_OUTCOME_FIELDS = (
    "ended_at",
    "latency_ms",
    "http_status",
    "tokens_in",
    "tokens_out",
    "cost",
    "error_class",
    "error_message",
    "is_billed",
    "consumes_attempt",
)


def call_deadline(provider: Provider, read_timeout: float | None) -> datetime:
    """When a call started now is over, answered or not: the connect timeout plus the read
    timeout, which also bounds a whole streamed answer (providers.base), plus a margin."""
    read = read_timeout or provider.read_timeout_s
    return timezone.now() + timedelta(seconds=provider.connect_timeout_s + read + DEADLINE_MARGIN_S)


def open_attempt(
    job: Job,
    *,
    provider: Provider,
    model: str,
    reserved_cost: Decimal,
    deadline_at: datetime,
) -> Attempt:
    """The row of a call about to be made, committed before the request is sent (the runner
    makes no transaction around a call: this INSERT commits on its own)."""
    return Attempt.objects.create(
        job=job,
        number=job.attempt_count,
        provider=provider,
        model=model,
        started_at=timezone.now(),
        state=Attempt.State.IN_FLIGHT,
        reserved_cost=reserved_cost,
        deadline_at=deadline_at,
    )


def settle(attempt: Attempt) -> str:
    """Write the call's outcome (the fields set on `attempt`) and charge its cost. Returns the
    state written: `settled`, or `superseded` when the call had been given up for lost (its
    run was recovered meanwhile): then the late answer's real cost replaces the reservation
    it was charged at, and the caller must not use the answer."""
    values = {name: getattr(attempt, name) for name in _OUTCOME_FIELDS}
    cost = Decimal(attempt.cost or 0)
    if Attempt.objects.filter(pk=attempt.pk, state=Attempt.State.IN_FLIGHT).update(
        state=Attempt.State.SETTLED, **values
    ):
        attempt.state = Attempt.State.SETTLED
        _charge(attempt.job, cost)
        return attempt.state
    charged = Attempt.objects.filter(pk=attempt.pk).values_list("cost", flat=True).first()
    values["consumes_attempt"] = False
    if Attempt.objects.filter(pk=attempt.pk, state=Attempt.State.UNKNOWN).update(
        state=Attempt.State.SUPERSEDED, **values
    ):
        attempt.state = Attempt.State.SUPERSEDED
        attempt.consumes_attempt = False
        _charge(attempt.job, cost - Decimal(charged or 0))
        log.warning(
            "job=%s: attempt %s answered after its run was recovered: paid (%s USD), unused",
            attempt.job.code,
            attempt.number,
            cost,
        )
        return attempt.state
    # Already superseded or settled (a second settle of the same call): nothing to add.
    return Attempt.objects.filter(pk=attempt.pk).values_list("state", flat=True).first() or ""


def lose(job: Job, *, why: str) -> int:
    """Settle the job's calls still in flight as `unknown`, each charged at its reservation:
    their worker can no longer record them (`why` says what happened to it). Returns how many.
    They do not use up the job's attempts: the job did not cause their end."""
    lost = 0
    now = timezone.now()
    for attempt in Attempt.objects.in_flight().filter(job=job):
        if Attempt.objects.filter(pk=attempt.pk, state=Attempt.State.IN_FLIGHT).update(
            state=Attempt.State.UNKNOWN,
            ended_at=now,
            cost=attempt.reserved_cost,
            error_class=UNKNOWN_ERROR_CLASS,
            error_message=f"{UNKNOWN_REASON} ({why})"[:2000],
            is_billed=True,
            consumes_attempt=False,
        ):
            attempt.job = job
            _charge(job, Decimal(attempt.reserved_cost))
            lost += 1
    return lost


def open_until(job: Job) -> datetime | None:
    """The latest deadline of the job's calls still in flight (None: none is)."""
    return Attempt.objects.in_flight().filter(job=job).aggregate(last=Max("deadline_at"))["last"]


def sweep(now: datetime) -> int:
    """Calls left in flight past their deadline by a run that is no longer running (the job
    was cancelled or expired mid-call, then its worker died): charge them as unknown. A live
    worker settles its call by the deadline; a running job's calls are lost with its run
    (runs.reconcile)."""
    jobs = (
        Job.objects.filter(attempts__state=Attempt.State.IN_FLIGHT, attempts__deadline_at__lt=now)
        .exclude(status=Job.Status.RUNNING)
        .distinct()
    )
    return sum(
        lose(job, why="its run ended and its worker never recorded the call") for job in jobs
    )


def _charge(job: Job, amount: Decimal) -> None:
    """Move `amount` (negative: a correction down) into the job's cost and its budgets."""
    if not amount:
        return
    # No transaction of its own (a write lock on SQLite for every call): budgets.settle opens
    # one only when a budget counts the call.
    Job.objects.filter(pk=job.pk).update(cost_actual=F("cost_actual") + amount)
    budgets.settle(job, amount)
    job.cost_actual = (job.cost_actual or Decimal(0)) + amount
