"""A job's run timeline, built from what is already recorded: its audit events (every status
change, with its reason) and its Attempt rows (the ledger).

    queued → each wait with its reason → each run with its attempts → settled

`build(events, attempts)` is pure over those rows (`timeline(job)` reads them: one query each;
a live update passes the ones it has already read), nothing written, nothing from Redis, so it
says the same on every web process and after a restart. A step lasts from the event that
entered its status to the next one that left it; the last step of a job still on its way lasts
until now.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.utils import timezone

from jobs.models import Attempt, Job, JobEvent

# What a waiting, held or scheduled job waits for, as the timeline names it.
WAIT_LABELS = {
    "capacity": "Waiting for capacity (concurrency cap)",
    "rate_limit": "Waiting for the rate limit",
    "breaker": "Waiting for the provider's breaker",
    "backoff": "Waiting to retry (backoff)",
    "retry_backoff": "Waiting to retry (backoff)",
    "retry_budget": "Waiting for the provider's retry budget",
    "paused": "Waiting: workload paused",
    "budget": "Held by a budget",
    "credit": "Held: provider out of credit",
    "off_peak": "Deferred to the off-peak window",
    "scheduled": "Scheduled",
    "chunks": "Waiting for its chunks",
    "other": "Waiting",
}
SETTLED = {
    Job.Status.SUCCEEDED: "Succeeded",
    Job.Status.FAILED: "Failed",
    Job.Status.CANCELLED: "Cancelled",
    Job.Status.EXPIRED: "Expired",
    Job.Status.NEEDS_REVIEW: "Sent to review",
}


@dataclass
class AttemptStep:
    attempt: Attempt
    # Seconds from the end of the job's previous call to the start of this one: the backoff
    # (or the whole park) before a retry. None for the job's first call.
    gap_s: float | None

    @property
    def duration_s(self) -> float | None:
        if self.attempt.ended_at is None:
            return None
        return (self.attempt.ended_at - self.attempt.started_at).total_seconds()

    # Display strings, formatted here: the template's floatformat filter made the card five
    # times as costly to render as the attempts table, on every live update of a watched job.
    @property
    def gap_text(self) -> str:
        return "" if self.gap_s is None else f"{self.gap_s:.1f} s"

    @property
    def duration_text(self) -> str:
        duration = self.duration_s
        return "in flight" if duration is None else f"{duration:.2f} s"

    @property
    def cost_text(self) -> str:
        return f"{self.attempt.cost:.6f}"

    @property
    def tokens(self) -> int:
        return self.attempt.tokens_in + self.attempt.tokens_out

    @property
    def cost(self) -> Decimal:
        return self.attempt.cost


@dataclass
class Step:
    # queued | wait | run | settled
    kind: str
    label: str
    started_at: datetime
    ended_at: datetime | None = None  # None: still in this step
    reason: str = ""
    wait_kind: str = ""  # for a wait, a key of WAIT_LABELS
    actor: str = ""  # who caused it, when a person did
    attempts: list[AttemptStep] = field(default_factory=list)  # a run's calls

    @property
    def duration_s(self) -> float:
        end = self.ended_at or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def duration_text(self) -> str:
        return f"{self.duration_s:.1f} s"

    @property
    def time_text(self) -> str:
        return f"{timezone.localtime(self.started_at):%H:%M:%S}"

    @property
    def is_current(self) -> bool:
        return self.ended_at is None and self.kind != "settled"


def wait_kind_of(event: JobEvent) -> str:
    """The kind of wait an event entered (a key of WAIT_LABELS): what the parking code
    recorded (services.do_park_job / do_hold_job), or, for an event written before it did
    (migration 0014), what the event's text says."""
    if kind := (event.data or {}).get("wait_kind"):
        return str(kind) if str(kind) in WAIT_LABELS else "other"
    return legacy_wait_kind(event.to_status, event.reason)


def legacy_wait_kind(status: str, reason: str) -> str:
    """The kind of an old event's wait, read from its words (the texts the parking code wrote
    before it recorded the kind). Migration 0014 keeps its own frozen copy for the rows."""
    text = reason.lower()
    if status == Job.Status.HELD:
        return "credit" if "credit" in text else "budget"
    if status == Job.Status.SCHEDULED:
        return "off_peak" if "off-peak" in text else "scheduled"
    if "breaker" in text:
        return "breaker"
    if "rate limit" in text or "429" in text:
        return "rate_limit"
    if "concurrency" in text or "capacity" in text or "cap full" in text:
        return "capacity"
    if "paused" in text:
        return "paused"
    if "retry budget" in text:
        return "retry_budget"
    if "retry" in text or "retrying" in text or "provider error" in text:
        return "backoff"
    if "chunk" in text:
        return "chunks"
    return "other"


def _step_for(event: JobEvent) -> Step:
    status, at = event.to_status, event.created_at
    actor = event.actor_label if event.actor_id else ""
    if status == Job.Status.QUEUED:
        if "replay" in (event.data or {}):
            label = f"Replayed (run {event.data['replay'] + 1})"
        elif not event.from_status:
            label = "Queued"
        else:
            label = "Queued again"
        return Step("queued", label, at, reason=event.reason, actor=actor)
    if status in (Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED):
        kind = wait_kind_of(event)
        return Step("wait", WAIT_LABELS[kind], at, reason=event.reason, wait_kind=kind, actor=actor)
    if status == Job.Status.RUNNING:
        worker = (event.data or {}).get("worker", "")
        return Step("run", "Running", at, reason=f"on {worker}" if worker else "", actor=actor)
    return Step(
        "settled", SETTLED.get(status, status), at, ended_at=at, reason=event.reason, actor=actor
    )


def timeline(job: Job) -> list[Step]:
    """The job's steps in time order; see the module docstring."""
    return build(
        job.events.select_related("actor").order_by("created_at", "id"),
        job.attempts.select_related("provider").order_by("number", "id"),
    )


def build(events: Iterable[JobEvent], attempts: Iterable[Attempt]) -> list[Step]:
    """The steps of a job with these events (oldest first) and attempts (by number)."""
    steps: list[Step] = []
    for event in events:
        if event.from_status == event.to_status and steps:
            continue  # a note (a review claim, an operator's remark), not a move
        if steps and steps[-1].ended_at is None:
            steps[-1].ended_at = event.created_at
        steps.append(_step_for(event))

    runs = [step for step in steps if step.kind == "run"]
    previous_end: datetime | None = None
    for attempt in attempts:
        gap = None
        if previous_end is not None:
            gap = max(0.0, (attempt.started_at - previous_end).total_seconds())
        run = _run_holding(runs, attempt.started_at)
        if run is not None:
            run.attempts.append(AttemptStep(attempt, gap))
        previous_end = attempt.ended_at or attempt.started_at
    return steps


def _run_holding(runs: list[Step], moment: datetime) -> Step | None:
    """The run a call started in: the last run that began at or before it (a call recorded a
    moment before its run's event, on a clock of another process, goes to the first run)."""
    holder = None
    for run in runs:
        if run.started_at <= moment:
            holder = run
    return holder or (runs[0] if runs else None)
