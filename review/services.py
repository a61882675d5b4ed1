"""State changes of the review inbox: escalate, claim, the four resolutions, and withdrawal.

Each resolution is one transaction: a conditional UPDATE closes the item (only if it is still
open and nobody else holds a live claim), then `jobs.services.transition` moves the job out of
needs_review and writes the JobEvent with the reviewer as actor. If either step loses a race
the whole thing rolls back and the caller gets ReviewError.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.dispatch import receiver
from django.utils import timezone

from jobs import live, queueing, replay
from jobs.flow import budgets
from jobs.models import Job, JobEvent
from jobs.services import stop_chunks, transition
from jobs.signals import job_stopped
from review import notifications
from review.models import ReviewItem
from review.validation import InvalidOutput, validate_output


class ReviewError(Exception):
    """The action was refused; the message is safe to show to the reviewer."""


# --------------------------------------------------------------------------- escalation


def do_escalate(
    job: Job,
    token: uuid.UUID,
    *,
    reason: str,
    evidence: dict[str, Any],
    **fields: Any,
) -> ReviewItem | None:
    """running → needs_review for the run holding `token`, and open a ReviewItem with it.

    `fields` are job fields to store with the transition (output_text, confidence, error,
    error_class). Returns None if the run lost its job meanwhile (cancelled, recovered).
    """
    label = ReviewItem.Reason(reason).label.lower()
    with transaction.atomic():
        won = transition(
            job,
            [Job.Status.RUNNING],
            Job.Status.NEEDS_REVIEW,
            reason=f"escalated to review: {label}",
            data={"review_reason": reason, "evidence": evidence},
            extra_filter={"run_token": token},
            run_token=None,
            stage="review",
            progress_message=f"Waiting for a reviewer ({label})",
            **fields,
        )
        if not won:
            return None
        item = ReviewItem.objects.create(
            job=job,
            reason=reason,
            evidence=evidence,
            output_text=job.output_text,
            confidence=job.confidence,
        )
        transaction.on_commit(notifications.item_arrived)
        _inbox_changed()
    return item


def _inbox_changed() -> None:
    """An item arrived, was claimed, released or closed: open inbox pages re-fetch their
    table once this transaction commits (jobs.live)."""
    live.stale_on_commit(live.REVIEW_GROUP)


# --------------------------------------------------------------------------- claims


def claim_minutes() -> int:
    return settings.AIQUEUE_REVIEW_CLAIM_MINUTES


def _available_to(user, now: datetime) -> Q:
    """Items this user may take: unclaimed, claim expired, or already theirs."""
    return Q(claimed_by__isnull=True) | Q(claim_expires_at__lte=now) | Q(claimed_by=user)


def do_claim(item: ReviewItem, user) -> bool:
    """Take the item for `claim_minutes()`; a reviewer re-claiming their own item extends it.

    One conditional UPDATE decides, so of two reviewers clicking at once exactly one wins.
    """
    now = timezone.now()
    expires = now + timedelta(minutes=claim_minutes())
    with transaction.atomic():
        won = (
            ReviewItem.objects.filter(pk=item.pk, status=ReviewItem.Status.OPEN)
            .filter(_available_to(user, now))
            .update(claimed_by=user, claimed_at=now, claim_expires_at=expires)
        )
        if won:
            _note(item, user, "claimed for review", now=now)
    if won:
        item.claimed_by, item.claimed_at, item.claim_expires_at = user, now, expires
    return bool(won)


def do_release(item: ReviewItem, user) -> bool:
    with transaction.atomic():
        released = ReviewItem.objects.filter(
            pk=item.pk, status=ReviewItem.Status.OPEN, claimed_by=user
        ).update(claimed_by=None, claimed_at=None, claim_expires_at=None)
        if released:
            _note(item, user, "released the review claim")
    if released:
        item.claimed_by = item.claimed_at = item.claim_expires_at = None
    return bool(released)


def release_expired_claims(now: datetime | None = None) -> int:
    """Return items whose claim timed out to the pool (the reconciler calls this)."""
    now = now or timezone.now()
    released = 0
    expired = ReviewItem.objects.filter(
        status=ReviewItem.Status.OPEN, claimed_by__isnull=False, claim_expires_at__lte=now
    )
    for item in expired.select_related("claimed_by"):
        with transaction.atomic():
            # Conditional on the same expiry: a reviewer who re-claimed meanwhile keeps it.
            done = ReviewItem.objects.filter(
                pk=item.pk, claimed_by=item.claimed_by_id, claim_expires_at=item.claim_expires_at
            ).update(claimed_by=None, claimed_at=None, claim_expires_at=None)
            if done:
                holder = item.claimed_by.get_username() if item.claimed_by else "?"
                _note(item, None, f"review claim of {holder} expired", now=now)
        released += done
    return released


def _note(item: ReviewItem, actor, reason: str, *, now: datetime | None = None) -> None:
    """An audit event that is not a status change (the status is written on both sides): a
    claim taken, released or expired, which the inbox shows."""
    _inbox_changed()
    status = Job.objects.filter(pk=item.job_id).values_list("status", flat=True).first() or ""
    JobEvent.objects.create(
        job_id=item.job_id,
        created_at=now or timezone.now(),
        actor=actor if actor is not None and actor.is_authenticated else None,
        from_status=status,
        to_status=status,
        reason=reason[:300],
        data={"review_item": item.pk},
    )


# --------------------------------------------------------------------------- resolutions


def _resolve(
    item: ReviewItem,
    user,
    resolution: str,
    *,
    to_status: str,
    reason: str,
    note: str = "",
    corrected_output: str = "",
    job_fields: dict[str, Any],
    data: dict[str, Any] | None = None,
) -> Job:
    now = timezone.now()
    with transaction.atomic():
        taken = (
            ReviewItem.objects.filter(pk=item.pk, status=ReviewItem.Status.OPEN)
            .filter(_available_to(user, now))
            .update(
                status=ReviewItem.Status.RESOLVED,
                resolution=resolution,
                resolved_by=user,
                resolved_at=now,
                claimed_by=user,
                claim_expires_at=None,
                corrected_output=corrected_output,
                note=note,
            )
        )
        if not taken:
            raise ReviewError(_why_not_available(item, user))
        job = Job.objects.select_related("workload").get(pk=item.job_id)
        won = transition(
            job,
            [Job.Status.NEEDS_REVIEW],
            to_status,
            actor=user,
            reason=reason,
            data={"review_item": item.pk, "resolution": resolution, **(data or {})},
            **job_fields,
        )
        if not won:
            raise ReviewError("The job is no longer waiting for review.")
        _inbox_changed()
    item.status, item.resolution, item.resolved_by, item.resolved_at = (
        ReviewItem.Status.RESOLVED,
        resolution,
        user,
        now,
    )
    item.corrected_output, item.note = corrected_output, note
    return job


def _why_not_available(item: ReviewItem, user) -> str:
    current = ReviewItem.objects.select_related("claimed_by").filter(pk=item.pk).first()
    if current is None or not current.is_open:
        return "This item was already resolved."
    holder = current.claim_holder()
    if holder is not None and holder.pk != user.pk:
        return f"{holder.get_username()} is working on this item."
    return "This item is not available."


def _done_fields() -> dict[str, Any]:
    return {
        "stage": "done",
        "progress_percent": 100,
        "progress_message": "",
        "finished_at": timezone.now(),
    }


def do_approve(item: ReviewItem, user, *, note: str = "") -> Job:
    """Accept the model's output as it is: job succeeded, marked human-approved."""
    job = item.job
    if not job.output_text:
        raise ReviewError("There is no output to approve. Edit it, retry or reject.")
    try:
        validate_output(job.workload, job.output_text)
    except InvalidOutput as exc:
        raise ReviewError(f"The output fails validation ({exc}). Edit it or retry.")
    return _resolve(
        item,
        user,
        ReviewItem.Resolution.APPROVED,
        to_status=Job.Status.SUCCEEDED,
        reason="approved in review",
        note=note,
        job_fields={"is_human_approved": True, "error": "", "error_class": "", **_done_fields()},
    )


def do_correct(item: ReviewItem, user, *, corrected_output: str, note: str = "") -> Job:
    """Replace the output with a reviewer's version (validated like model output): job
    succeeded. The model's original stays in `output_text`."""
    corrected_output = corrected_output.strip()
    if not corrected_output:
        raise ReviewError("The corrected output is empty.")
    try:
        corrected_output, output_data = validate_output(item.job.workload, corrected_output)
    except InvalidOutput as exc:
        raise ReviewError(f"The corrected output is not valid: {exc}")
    return _resolve(
        item,
        user,
        ReviewItem.Resolution.CORRECTED,
        to_status=Job.Status.SUCCEEDED,
        reason="corrected and approved in review",
        note=note,
        corrected_output=corrected_output,
        job_fields={
            "corrected_output": corrected_output,
            "output_data": output_data,
            "is_human_approved": True,
            "error": "",
            "error_class": "",
            **_done_fields(),
        },
    )


def do_retry(
    item: ReviewItem, user, *, overrides: dict[str, Any] | None = None, note: str = ""
) -> Job:
    """Back to the queue, optionally with another provider/model, temperature or prompt.

    New attempts append to the same job; if the new run escalates again it gets a new item.
    """
    overrides = replay.clean_overrides(overrides)
    _check_budgetable(item.job, {**(item.job.overrides or {}), **overrides})
    job = _resolve(
        item,
        user,
        ReviewItem.Resolution.RETRIED,
        to_status=Job.Status.QUEUED,
        reason="sent back to the queue from review",
        note=note,
        data={"overrides": overrides} if overrides else None,
        job_fields={
            **replay.fresh_run_fields(),
            "overrides": {**(item.job.overrides or {}), **overrides},
        },
    )
    transaction.on_commit(lambda: queueing.enqueue(job))
    return job


def _check_budgetable(job: Job, overrides: dict[str, Any]) -> None:
    """A retry on a model without a price cannot be reserved on the job's budgets: refuse it
    rather than let the call go unbudgeted."""
    if not budgets.budgets_for(job, overrides):
        return
    provider, model = budgets.chosen_target(job.workload, overrides)
    if provider.price_for(model) is None:
        raise ReviewError(
            f"Not retried: a budget applies, and model {model!r} of {provider.name!r} has no "
            "price, so its call cannot be reserved. Add the price in the admin (Providers → "
            "prices) or choose another model."
        )


def do_reject(item: ReviewItem, user, *, reason: str) -> Job:
    reason = reason.strip()
    if not reason:
        raise ReviewError("Say why the output is rejected.")
    with transaction.atomic():
        job = _resolve(
            item,
            user,
            ReviewItem.Resolution.REJECTED,
            to_status=Job.Status.FAILED,
            reason=f"rejected in review: {reason}",
            note=reason,
            job_fields={
                "error": f"Rejected in review: {reason}",
                "error_class": "review_rejected",
                **_done_fields(),
            },
        )
        # A rejected document wants none of its chunks: one still in review is withdrawn.
        stop_chunks(job, actor=user, reason="its document was rejected in review")
    return job


@receiver(job_stopped, dispatch_uid="review-withdraw-stopped")
def _job_stopped(sender, job: Job, actor=None, reason: str = "", **kwargs) -> None:
    """A job ended without its result (its document was cancelled or expired, say): its open
    items are closed as withdrawn, since nobody wants its result any more. Unlike the four
    resolutions it needs no claim: a reviewer working on the item is told it was already
    resolved."""
    closed = ReviewItem.objects.filter(job=job, status=ReviewItem.Status.OPEN).update(
        status=ReviewItem.Status.RESOLVED,
        resolution=ReviewItem.Resolution.WITHDRAWN,
        resolved_by=actor if actor is not None and actor.is_authenticated else None,
        resolved_at=timezone.now(),
        claim_expires_at=None,
        note=reason[:300],
    )
    if closed:
        _inbox_changed()


# --------------------------------------------------------------------------- lists


def open_items() -> QuerySet[ReviewItem]:
    return ReviewItem.objects.filter(status=ReviewItem.Status.OPEN).select_related(
        "job__workload", "claimed_by"
    )


def next_item_for(user, *, exclude: Iterable[int] = ()) -> ReviewItem | None:
    """The oldest open item this user can take (unclaimed, expired, or their own)."""
    return (
        open_items()
        .filter(_available_to(user, timezone.now()))
        .exclude(pk__in=list(exclude))
        .order_by("created_at", "id")
        .first()
    )


@dataclass
class BulkResult:
    done: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self, verb: str) -> str:
        text = f"{verb} {self.done} item{'s' if self.done != 1 else ''}."
        if self.skipped:
            text += f" Skipped {len(self.skipped)}: " + "; ".join(self.skipped[:5])
            if len(self.skipped) > 5:
                text += " …"
        return text


def do_bulk(user, item_ids: Iterable[int], action: str, *, reason: str = "") -> BulkResult:
    """Apply one action to many items, each through the same service as a single action and
    in its own transaction, so one refused item does not undo the others."""
    result = BulkResult()
    items = ReviewItem.objects.filter(pk__in=list(item_ids)).select_related("job__workload")
    for item in items.order_by("created_at", "id"):
        try:
            if action == "approve":
                do_approve(item, user)
            elif action == "retry":
                do_retry(item, user)
            elif action == "reject":
                do_reject(item, user, reason=reason)
            else:
                raise ReviewError(f"Unknown action {action!r}.")
        except ReviewError as exc:
            result.skipped.append(f"#{item.pk}: {exc}")
        else:
            result.done += 1
    return result
