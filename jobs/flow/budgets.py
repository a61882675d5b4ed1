"""Budgets: reserve a job's worst-case cost at submit, settle each attempt, release at the end.

The invariant is `spent + reserved <= cap` for every budget, kept by a conditional UPDATE
(`… SET reserved = reserved + x WHERE spent + reserved + x <= cap`) in the same transaction
that creates the job: concurrent submissions serialise on the budget row and the database,
not a lock in Python, decides who fits. Amounts are integer billionths of a USD (exact on
SQLite and PostgreSQL alike).

Lifecycle of the money of one job:
- `reserve()` at submit (or when a held job is released): one BudgetReservation per budget
  that applies (the global ones and the workload's own);
- `settle_attempt()` for each provider call (an Attempt post_save): spent += cost, and the
  job's reservation shrinks by as much, so the call moves money from reserved to spent;
- `release()` when the job can no longer spend: the rest of the reservation is given back.
  The runner calls it in `finally`; cancel and expiry call it; the reconciler releases what
  a dead process left behind (`release_leaked()`).

A job whose cost cannot be estimated (no price for its model) is refused at submit when a
budget applies to it. Attempts are settled against the budgets that apply at the time, so a
budget created after a job was submitted still counts that job's spend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.utils import timezone

from jobs.models import (
    Attempt,
    Budget,
    BudgetReservation,
    Job,
    Priority,
    Provider,
    Workload,
    nanos_to_usd,
    usd_to_nanos,
)

log = logging.getLogger(__name__)

# Chat formats add a few tokens per message around the text; be generous, this is a ceiling.
MESSAGE_OVERHEAD_TOKENS = 8
# Statuses in which a job may still spend money, so its reservation must stay.
ACTIVE_STATUSES = frozenset(
    {
        Job.Status.QUEUED,
        Job.Status.RUNNING,
        Job.Status.WAITING,
        Job.Status.HELD,
        Job.Status.SCHEDULED,
    }
)
PRIORITY_RANK = {Priority.HIGH: 0, Priority.DEFAULT: 1, Priority.LOW: 2}
RELEASE_HELD_BATCH = 200


class CannotEstimate(Exception):
    """No price is known for the job's model: its worst-case cost is unknown."""


@dataclass(frozen=True)
class Estimate:
    tokens_in: int
    tokens_out: int
    nanos: int

    @property
    def usd(self) -> Decimal:
        return nanos_to_usd(self.nanos)


# --- estimation ---------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """ceil(len / 4): the usual rule of thumb for English text (the simulator uses it too)."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_input_tokens(workload: Workload, input_text: str) -> int:
    prompt = workload.render_prompt(input_text)
    labels = ", ".join(str(label) for label in (workload.labels or []))
    return (
        estimate_tokens(workload.system_prompt)
        + estimate_tokens(prompt)
        + estimate_tokens(labels)
        + 2 * MESSAGE_OVERHEAD_TOKENS
    )


def estimate(
    workload: Workload,
    input_text: str,
    *,
    min_tokens_in: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Estimate:
    """The job's worst-case cost for one call: estimated input (at least `min_tokens_in`) +
    max output tokens, at the dearest of the models a call may go to (`call_targets`: a
    reviewer's override or the workload's own, and its fallback). Raises CannotEstimate
    without a price for the first."""
    tokens_in = max(estimate_input_tokens(workload, input_text), min_tokens_in)
    tokens_out = workload.max_output_tokens
    costs = []
    for index, (provider, model) in enumerate(call_targets(workload, overrides)):
        price = provider.price_for(model)
        if price is None:
            if index == 0:
                raise CannotEstimate(
                    f"cannot estimate cost: no price for model {model!r} of provider "
                    f"{provider.name!r}; add one in the admin (Providers → prices)."
                )
            continue
        costs.append(price.cost(tokens_in, tokens_out))
    return Estimate(tokens_in, tokens_out, usd_to_nanos(max(costs)))


def estimate_for(job: Job, *, min_tokens_in: int = 0) -> Estimate:
    """`estimate` for the call this job makes. A document's own call is its reduce call, which
    reads its chunks' answers, not the document (each chunk reserves its own call): its input
    is counted as every chunk's answer at the workload's max output tokens
    (`documents.reduce_input_tokens`), whatever the document's length."""
    from jobs import documents  # documents builds on jobs.services, which builds on this

    if documents.is_document_parent(job):
        reduce_tokens = documents.reduce_input_tokens(job)
        return estimate(
            job.workload,
            "",
            min_tokens_in=max(min_tokens_in, reduce_tokens),
            overrides=job.overrides,
        )
    return estimate(
        job.workload, job.input_text, min_tokens_in=min_tokens_in, overrides=job.overrides
    )


def chosen_target(
    workload: Workload, overrides: dict[str, Any] | None = None
) -> tuple[Provider, str]:
    """(provider, model) a job's calls go to: what a reviewer chose for its retry
    (`Job.overrides`; a provider only while it is active), else the workload's own."""
    provider, model = workload.provider, workload.model
    if overrides:
        if overrides.get("provider_id"):
            chosen = Provider.objects.filter(pk=overrides["provider_id"], is_active=True).first()
            provider = chosen or provider
        model = overrides.get("model") or model
    return provider, model


def call_targets(
    workload: Workload, overrides: dict[str, Any] | None = None
) -> list[tuple[Provider, str]]:
    """(provider, model) of the calls a job may make: `chosen_target`, then the workload's
    fallback."""
    targets = [chosen_target(workload, overrides)]
    if workload.fallback_provider_id:
        targets.append((workload.fallback_provider, workload.fallback_model or workload.model))
    return targets


# --- periods --------------------------------------------------------------------------------


def period_start_for(period: str, now: datetime) -> datetime:
    local = timezone.localtime(now)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Budget.Period.MONTH:
        start = start.replace(day=1)
    return start


def next_period_start(period: str, now: datetime) -> datetime:
    start = period_start_for(period, now)
    if period == Budget.Period.MONTH:
        # The 1st of next month: day 28 + 4 days always lands in the next month.
        return period_start_for(period, start.replace(day=28) + timedelta(days=4))
    return period_start_for(period, start + timedelta(days=1, hours=2))


def roll_periods(now: datetime | None = None) -> list[int]:
    """Start a new period for every budget whose period is over: spent goes back to 0.

    Reservations carry over (their jobs may still spend); what they spend counts in the new
    period. Returns the ids of the budgets that rolled over."""
    now = now or timezone.now()
    rolled = []
    for budget in Budget.objects.all():
        start = period_start_for(budget.period, now)
        if budget.period_start < start:
            # Conditional on the old start: two reconcilers cannot both reset.
            if Budget.objects.filter(pk=budget.pk, period_start=budget.period_start).update(
                spent_nanos=0, period_start=start
            ):
                log.info("budget %s: new %s period from %s", budget.name, budget.period, start)
                rolled.append(budget.pk)
    return rolled


# --- reserve, settle, release ---------------------------------------------------------------


def budgets_for(workload: Workload | int) -> list[Budget]:
    """The budgets a job of this workload (or workload id) counts against: every global one,
    and its own."""
    # In creation order: the default ordering (by workload name) would join jobs_workload.
    return list(
        Budget.objects.filter(Q(workload__isnull=True) | Q(workload=workload)).order_by("pk")
    )


class _Exhausted(Exception):
    def __init__(self, budget: Budget) -> None:
        self.budget = budget


def reserve(job: Job, nanos: int, budgets: list[Budget]) -> Budget | None:
    """Make the job's reservation `nanos` on every budget, all or nothing: what it already
    holds there counts, only the difference is added (`top_up`). Returns None on success,
    else the first budget that could not take it (nothing changes then).

    Runs in a savepoint, so call it inside the transaction that admits the job."""
    try:
        with transaction.atomic():
            # `cost_reserved` is set and cleared with the reservations: zero, nothing held.
            held = (
                {
                    r.budget_id: r
                    for r in BudgetReservation.objects.select_for_update().filter(job=job)
                }
                if job.cost_reserved
                else {}
            )
            for budget in budgets:
                current = held.get(budget.pk)
                more = nanos - (current.amount_nanos if current else 0)
                if more <= 0:
                    continue
                _add_reserved(budget, more)
                if current:
                    BudgetReservation.objects.filter(pk=current.pk).update(amount_nanos=nanos)
                else:
                    BudgetReservation.objects.create(budget=budget, job=job, amount_nanos=nanos)
            Job.objects.filter(pk=job.pk).update(cost_reserved=nanos_to_usd(nanos))
    except _Exhausted as exc:
        return exc.budget
    job.cost_reserved = nanos_to_usd(nanos)
    return None


def _add_reserved(budget: Budget, nanos: int) -> None:
    """reserved += nanos if spent + reserved + nanos stays within the cap, in one conditional
    UPDATE (no read, so no race); raises _Exhausted otherwise."""
    fits = Budget.objects.filter(
        pk=budget.pk,
        cap_nanos__gte=F("spent_nanos") + F("reserved_nanos") + nanos,
    ).update(reserved_nanos=F("reserved_nanos") + nanos)
    if not fits:
        raise _Exhausted(budget)


def reserve_for(job: Job) -> Budget | None:
    """Reserve the job's worst-case cost on every budget that applies to it (inside the
    transaction that admits it). Returns the budget that is exhausted, or None.
    Raises CannotEstimate when a budget applies but the model has no price."""
    applicable = budgets_for(job.workload)
    if not applicable:
        return None
    return reserve(job, estimate_for(job).nanos, applicable)


def top_up(job: Job, *, min_tokens_in: int = 0) -> Budget | None:
    """Before another call of a job that has already spent part of its reservation (a retry
    after a paid call, the extract repair call): make the job's reservation on every budget
    cover one more worst-case call again, all or nothing, under the cap. Returns the budget
    that cannot take it (nothing changes then), else None.

    Reserving one call at submit and topping up before each further paid call keeps the
    guarantee per call: spent + reserved never passes a cap, however many calls a job makes.
    """
    applicable = budgets_for(job.workload)
    if not applicable:
        return None
    try:
        need = estimate_for(job, min_tokens_in=min_tokens_in).nanos
    except CannotEstimate:
        log.warning("job=%s: no price any more for its model; call not reserved", job.code)
        return None
    return reserve(job, need, applicable)


def usd_text(amount: Decimal) -> str:
    """A budget amount in messages and the admin: calls cost fractions of a cent, and four
    decimals printed a used budget as "0.0000"."""
    return f"{amount:.6f}"


def reject_message(budget: Budget) -> str:
    return (
        f"Budget {budget.name!r} is exhausted ({usd_text(budget.spent_usd + budget.reserved_usd)} "
        f"of {usd_text(budget.cap_usd)} USD used this {budget.period}). Nothing was submitted; the "
        "budget renews at the start of the next period or when an operator raises it."
    )


def never_fits_message(budget: Budget, nanos: int) -> str | None:
    """Why a job can never run under `budget` as it stands, or None: one call of it may cost
    more than the budget's whole cap, so no renewal helps (only a higher cap)."""
    if nanos <= budget.cap_nanos:
        return None
    return (
        f"budget {budget.name!r} allows {usd_text(budget.cap_usd)} USD a {budget.period} and one "
        f"call of this job may cost up to {usd_text(nanos_to_usd(nanos))} USD: it runs only once "
        "the cap is raised"
    )


def seconds_until_renewal(budget: Budget) -> int:
    return max(
        1, int((next_period_start(budget.period, timezone.now()) - timezone.now()).total_seconds())
    )


def settle(job_id: int, workload_id: int, cost: Decimal) -> None:
    """One call's actual cost: spent += cost on each budget that applies, and the job's
    reservation on it shrinks by as much as it still holds."""
    nanos = usd_to_nanos(cost)
    if nanos <= 0:
        return
    budgets = budgets_for(workload_id)
    if not budgets:
        return  # no transaction (on SQLite a write lock) for a call no budget counts
    with transaction.atomic():
        for budget in budgets:
            # select_for_update serialises with release() on PostgreSQL; SQLite's IMMEDIATE
            # transactions already serialise writers.
            held = (
                BudgetReservation.objects.select_for_update()
                .filter(budget=budget, job_id=job_id)
                .first()
            )
            moved = min(nanos, held.amount_nanos) if held else 0
            if held:
                BudgetReservation.objects.filter(pk=held.pk).update(
                    amount_nanos=F("amount_nanos") - moved
                )
            Budget.objects.filter(pk=budget.pk).update(
                spent_nanos=F("spent_nanos") + nanos,
                reserved_nanos=F("reserved_nanos") - moved,
            )
            _alert_if_crossed(budget, nanos - moved)


def _alert_if_crossed(budget: Budget, added: int) -> None:
    fresh = Budget.objects.filter(pk=budget.pk).first()
    if fresh is None or fresh.cap_nanos <= 0:
        return
    threshold = fresh.alert_threshold * fresh.cap_nanos
    used = fresh.spent_nanos + fresh.reserved_nanos
    if used >= threshold > used - added:
        log.warning(
            "budget %s crossed its alert threshold: %s of %s USD used",
            fresh.name,
            nanos_to_usd(used),
            fresh.cap_usd,
        )


def release(job: Job | int) -> int:
    """Give back what the job still holds on every budget. Idempotent. Returns the nanos
    released (summed over budgets)."""
    job_id = job if isinstance(job, int) else job.pk
    released = 0
    with transaction.atomic():
        held = list(BudgetReservation.objects.select_for_update().filter(job_id=job_id))
        for reservation in held:
            if BudgetReservation.objects.filter(pk=reservation.pk).delete()[0]:
                Budget.objects.filter(pk=reservation.budget_id).update(
                    reserved_nanos=F("reserved_nanos") - reservation.amount_nanos
                )
                released += reservation.amount_nanos
        if held:
            Job.objects.filter(pk=job_id).update(cost_reserved=Decimal(0))
    if held and Job.objects.filter(status=Job.Status.HELD).exists():
        transaction.on_commit(release_held)
    return released


def release_leaked() -> int:
    """Reservations of jobs that can no longer spend (the process that should have released
    them died). Returns how many jobs were released."""
    job_ids = set(
        BudgetReservation.objects.exclude(job__status__in=ACTIVE_STATUSES).values_list(
            "job_id", flat=True
        )
    )
    for job_id in job_ids:
        release(job_id)
    return len(job_ids)


# --- held jobs ------------------------------------------------------------------------------


def hold_reason(budget: Budget, nanos: int = 0) -> str:
    """Why a job needing `nanos` is held on `budget` (said on its page and in the audit)."""
    never = never_fits_message(budget, nanos)
    if never is not None:
        return never
    return (
        f"budget {budget.name!r} exhausted ({usd_text(budget.spent_usd + budget.reserved_usd)} of "
        f"{usd_text(budget.cap_usd)} USD this {budget.period}); held until it frees"
    )


def release_held(limit: int = RELEASE_HELD_BATCH) -> int:
    """Reserve for held jobs that now fit and resume them, highest priority first, then
    oldest first. A job that does not fit blocks lower-ranked jobs on the same budget, so a
    big high-priority job is not overtaken forever by small low-priority ones."""
    from jobs import services

    held = list(
        Job.objects.filter(status=Job.Status.HELD)
        .select_related("workload__provider", "workload__fallback_provider")
        .order_by("created_at", "id")[: limit * 5]
    )
    held.sort(key=lambda j: (PRIORITY_RANK.get(j.priority, 1), j.created_at, j.id))
    blocked: set[int] = set()
    resumed = 0
    for job in held[:limit]:
        budgets = budgets_for(job.workload)
        if blocked.intersection(b.pk for b in budgets):
            continue
        try:
            cost = estimate_for(job)
        except CannotEstimate:
            cost = None
        with transaction.atomic():
            if budgets and cost is not None:
                full = reserve(job, cost.nanos, budgets)
                if full is not None:
                    blocked.add(full.pk)
                    continue
            if not services.do_resume_job(job, reason="budget freed: released from hold"):
                # Cancelled or expired meanwhile: give the money back.
                transaction.set_rollback(True)
                continue
        resumed += 1
    return resumed


# --- signals --------------------------------------------------------------------------------


@receiver(post_save, sender=Attempt, dispatch_uid="budgets-settle-attempt")
def _settle_attempt(sender, instance: Attempt, created: bool, **kwargs) -> None:
    if created and instance.cost:
        if Attempt.job.is_cached(instance):
            workload_id = instance.job.workload_id
        else:
            workload_id = (
                Job.objects.filter(pk=instance.job_id).values_list("workload_id", flat=True).first()
            )
        if workload_id is not None:
            settle(instance.job_id, workload_id, Decimal(instance.cost))


@receiver(post_save, sender=Budget, dispatch_uid="budgets-release-held")
def _budget_saved(sender, instance: Budget, **kwargs) -> None:
    # A raised cap (or a new period) may let held jobs in: try once the change is committed.
    transaction.on_commit(release_held)
