"""Budgets: reserve a job's worst-case cost at submit, settle each attempt, release at the end.

The invariant is `spent + reserved <= cap` for every budget, kept by a conditional UPDATE
(`… SET reserved = reserved + x WHERE spent + reserved + x <= cap`) in the same transaction
that creates the job: concurrent submissions serialise on the budget row and the database,
not a lock in Python, decides who fits. Amounts are integer billionths of a USD (exact on
SQLite and PostgreSQL alike).

Lifecycle of the money of one job:
- `reserve()` at submit (or when a held job is released): one BudgetReservation per budget
  that applies (the global ones and the workload's own);
- `settle()` for each provider call, when its ledger row is settled (jobs.ledger: by the worker
  that made it, or at its reservation by the reconciler when its worker died): spent += cost,
  and the job's reservation shrinks by as much, so the call moves money from reserved to spent;
- `release()` when the job can no longer spend: the rest of the reservation is given back,
  except the worst case of its calls still in flight, which stays reserved until each is
  settled. The runner calls it in `finally`; cancel and expiry call it; the reconciler
  releases what a dead process left behind (`release_leaked()`).

A job whose cost cannot be estimated (no price for its model) is refused at submit when a
budget applies to it. Attempts are settled against the budgets that apply at the time, so a
budget created after a job was submitted still counts that job's spend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F, Q, Sum
from django.db.models.lookups import GreaterThanOrEqual
from django.utils import timezone

from jobs import costs, documents, kinds
from jobs.models import (
    Attempt,
    Budget,
    BudgetReservation,
    Job,
    ModelPrice,
    Priority,
    Provider,
    Workload,
    nanos_to_usd,
    period_start_for,
    usd_to_nanos,
)
from jobs.signals import budget_alert

log = logging.getLogger(__name__)

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
    # The price it was computed at (the dearest of the models a call may go to), and how many
    # calls it covers: what the form and the batch preview say it is based on.
    price: ModelPrice | None = None
    calls: int = 1

    @property
    def usd(self) -> Decimal:
        return nanos_to_usd(self.nanos)

    @property
    def basis(self) -> str:
        return costs.BASIS


# --- estimation ---------------------------------------------------------------------------


def estimate_input_tokens(
    workload: Workload, input_text: str | dict[str, str], overrides: dict[str, Any] | None = None
) -> int:
    """The most input tokens of one call of `workload` for this input (a string fills
    {input}; a dict holds the template's named fields): the system prompt as jobs.kinds sends
    it, the rendered prompt (or a reviewer's replacement), and an extract workload's schema,
    under the one rule of jobs.costs."""
    prompt = (overrides or {}).get("prompt") or workload.render_prompt(input_text)
    return costs.input_tokens(
        kinds.system_prompt_for(workload), prompt, kinds.response_schema(workload)
    )


def estimate(
    workload: Workload,
    input_text: str | dict[str, str],
    *,
    min_tokens_in: int = 0,
    overrides: dict[str, Any] | None = None,
    prices: dict[tuple[int, str], ModelPrice | None] | None = None,
) -> Estimate:
    """The job's worst-case cost for one call: its input's upper bound (at least
    `min_tokens_in`) + max output tokens, at the dearest of the models a call may go to
    (`call_targets`: a reviewer's override or the workload's own, and its fallback). Raises
    CannotEstimate without a price for the first. `prices` memoizes the price lookups of a
    caller that estimates many inputs (the batch preview)."""
    tokens_in = max(estimate_input_tokens(workload, input_text, overrides), min_tokens_in)
    tokens_out = workload.max_output_tokens
    costs_by_target = []
    for index, (provider, model) in enumerate(call_targets(workload, overrides)):
        if prices is None:
            price = provider.price_for(model)
        else:
            if (provider.pk, model) not in prices:
                prices[provider.pk, model] = provider.price_for(model)
            price = prices[provider.pk, model]
        if price is None:
            if index == 0:
                raise CannotEstimate(
                    f"cannot estimate cost: no price for model {model!r} of provider "
                    f"{provider.name!r}; add one in the admin (Providers → prices)."
                )
            continue
        costs_by_target.append((price.cost(tokens_in, tokens_out), price))
    cost, price = max(costs_by_target, key=lambda item: item[0])
    return Estimate(tokens_in, tokens_out, usd_to_nanos(cost), price)


def estimate_job(
    workload: Workload,
    input_text: str | dict[str, str],
    *,
    prices: dict[tuple[int, str], ModelPrice | None] | None = None,
) -> Estimate:
    """What a whole job may cost (the batch preview, the new-job form): one call, and for an
    extract workload its repair call, which resends the prompt with the first answer (up to
    max output tokens) and the validation error."""
    one = estimate(workload, input_text, prices=prices)
    if workload.kind != Workload.Kind.EXTRACT:
        return one
    repair_in = one.tokens_in + one.tokens_out + costs.text_tokens(kinds.REPAIR_PROMPT) + 300
    repair = estimate(workload, input_text, min_tokens_in=repair_in, prices=prices)
    return Estimate(
        one.tokens_in + repair.tokens_in,
        one.tokens_out + repair.tokens_out,
        one.nanos + repair.nanos,
        one.price,
        calls=2,
    )


def estimate_for(job: Job, *, min_tokens_in: int = 0) -> Estimate:
    """`estimate` for the call this job makes. A document's own call is its reduce call, which
    reads its chunks' answers, not the document (each chunk reserves its own call): its input
    is counted as every chunk's answer at the workload's max output tokens
    (`documents.reduce_input_tokens`), whatever the document's length."""
    if documents.is_document_parent(job):
        reduce_tokens = documents.reduce_input_tokens(job)
        return estimate(
            job.workload,
            "",
            min_tokens_in=max(min_tokens_in, reduce_tokens),
            overrides=job.overrides,
        )
    return estimate(
        job.workload, kinds.prompt_values(job), min_tokens_in=min_tokens_in, overrides=job.overrides
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


# Asked on every submission and several times per run, mostly to find that no budget applies:
# written out, as the ORM would compile it, because compiling that three-way OR cost more than
# running it (0.4 ms of a submission's ~5). In creation order: the default ordering (by
# workload name) would join jobs_workload. A NULL id matches only the budgets without it.
_CANDIDATES_SQL = (
    "SELECT * FROM jobs_budget"
    " WHERE (workload_id IS NULL OR workload_id = %s)"
    " AND (user_id IS NULL OR user_id = %s)"
    " AND (api_token_id IS NULL OR api_token_id = %s)"
    " ORDER BY id"
)


def budgets_for(job: Job, overrides: dict[str, Any] | None = None) -> list[Budget]:
    """The budgets `job` counts against: each whose every scope that is set matches it (its
    workload, submitter, API token, and the model its calls go to first: `overrides`, as a
    retry would run, else the job's own), so every global one too.

    Reserve, top up, settle and release all ask here, so a job's money moves on one set."""
    scope = [job.workload_id, job.submitted_by_id, job.api_token_id]
    found = list(Budget.objects.raw(_CANDIDATES_SQL, scope))
    if not any(budget.model for budget in found):
        return found
    model = first_model(job, job.overrides if overrides is None else overrides)
    return [budget for budget in found if not budget.model or budget.model == model]


def first_model(job: Job, overrides: dict[str, Any] | None = None) -> str:
    """The model a job's calls go to first (chosen_target's, without reading the provider)."""
    return (overrides or {}).get("model") or job.workload.model


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
                claim_alert(budget.pk)
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
    applicable = budgets_for(job)
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
    applicable = budgets_for(job)
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


def local_time_text(moment: datetime) -> str:
    """A period's start as people read it: the local date and time to the second."""
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S}"


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


def settle(job: Job, cost: Decimal) -> None:
    """One call's actual cost: spent += cost on each budget that applies, and the job's
    reservation on it shrinks by as much as it still holds. Called by jobs.ledger when a
    call's row is settled (a negative cost corrects an earlier charge down)."""
    nanos = usd_to_nanos(cost)
    if nanos == 0:
        return
    job_id = job.pk
    budgets = budgets_for(job)
    if not budgets:
        return  # no transaction (on SQLite a write lock) for a call no budget counts
    if nanos < 0:
        # A correction down: a call charged at its reservation turned out cheaper (a late
        # answer, jobs.ledger). The reservation it came out of is not given back.
        for budget in budgets:
            Budget.objects.filter(pk=budget.pk).update(spent_nanos=F("spent_nanos") + nanos)
        return
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
            if nanos > moved:  # use grew (a call dearer than what it held)
                claim_alert(budget.pk)


def claim_alert(budget_id: int) -> bool:
    """If the budget's use (spent + reserved) has reached its alert threshold and no alert
    went out this period, mark it alerted and send `budget_alert` once the transaction
    commits. One conditional UPDATE: of processes crossing the line at once, one alerts.
    Called where use grows: a reservation (submit, release, top-up) and a settled call."""
    used = F("spent_nanos") + F("reserved_nanos")
    claimed = (
        Budget.objects.filter(pk=budget_id, cap_nanos__gt=0)
        .filter(Q(alerted_at__isnull=True) | Q(alerted_at__lt=F("period_start")))
        .filter(GreaterThanOrEqual(used, F("cap_nanos") * F("alert_threshold")))
        .update(alerted_at=timezone.now())
    )
    if claimed:
        log.warning("budget %s reached its alert threshold", budget_id)
        transaction.on_commit(lambda: budget_alert.send(sender=Budget, budget_id=budget_id))
    return bool(claimed)


def release(job: Job | int) -> int:
    """Give back what the job still holds on every budget, but the worst case of its calls
    still in flight: those may yet be billed, and stay counted until their ledger rows are
    settled (the settling run releases the rest when it ends). Idempotent. Returns the nanos
    released (summed over budgets)."""
    job_id = job if isinstance(job, int) else job.pk
    released = 0
    with transaction.atomic():
        held = list(BudgetReservation.objects.select_for_update().filter(job_id=job_id))
        keep = in_flight_nanos(job_id) if held else 0
        for reservation in held:
            give = reservation.amount_nanos - min(reservation.amount_nanos, keep)
            if give <= 0:
                continue
            if keep:
                done = BudgetReservation.objects.filter(pk=reservation.pk).update(
                    amount_nanos=F("amount_nanos") - give
                )
            else:
                done = BudgetReservation.objects.filter(pk=reservation.pk).delete()[0]
            if done:
                Budget.objects.filter(pk=reservation.budget_id).update(
                    reserved_nanos=F("reserved_nanos") - give
                )
                released += give
        if held:
            Job.objects.filter(pk=job_id).update(cost_reserved=nanos_to_usd(keep))
    return released


def in_flight_nanos(job_id: int) -> int:
    """The worst case of the job's calls in flight (their ledger rows' `reserved_cost`)."""
    total = Attempt.objects.in_flight().filter(job_id=job_id).aggregate(s=Sum("reserved_cost"))["s"]
    return usd_to_nanos(total) if total else 0


def release_leaked() -> int:
    """Reservations of jobs that can no longer spend (the process that should have released
    them died). Returns how many jobs were released."""
    job_ids = set(
        BudgetReservation.objects.exclude(job__status__in=ACTIVE_STATUSES).values_list(
            "job_id", flat=True
        )
    )
    # A job whose call is still in flight keeps that call's worst case (`release`).
    return sum(1 for job_id in job_ids if release(job_id))


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
