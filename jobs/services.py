"""State changes that touch several things: transition + audit event + enqueue.

Every status change goes through `transition()`, a compare-and-set on the row: the loser of a
race updates nothing and gets False. Each successful transition writes one JobEvent in the same
transaction, so the audit log and the status can never disagree.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from jobs import queueing
from jobs.flow import backpressure, budgets
from jobs.models import Budget, Job, JobEvent, Priority, Workload

log = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
MAX_INPUT_CHARS = 100_000


class SubmitError(Exception):
    """The submission was refused; the message is safe to show to the submitter."""


class Overloaded(SubmitError):
    """Refused for now (queue full, budget exhausted): try again after `retry_after` seconds.
    The API answers 429 with Retry-After."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def transition(
    job: Job,
    from_statuses: Iterable[str],
    to_status: str,
    *,
    actor: AbstractBaseUser | None = None,
    reason: str = "",
    data: dict[str, Any] | None = None,
    extra_filter: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move `job` to `to_status` if it is still in one of `from_statuses`.

    Returns whether this call won. On success the in-memory `job` is updated too.
    """
    from_statuses = list(from_statuses)
    now = timezone.now()
    with transaction.atomic():
        if len(from_statuses) == 1:
            # One possible source status: the conditional UPDATE alone decides (no read).
            current = from_statuses[0]
        else:
            current = (
                Job.objects.filter(pk=job.pk, status__in=from_statuses, **(extra_filter or {}))
                .order_by()
                .values_list("status", flat=True)
                .first()
            )
            if current is None:
                return False
        updated = Job.objects.filter(pk=job.pk, status=current, **(extra_filter or {})).update(
            status=to_status, updated_at=now, **fields
        )
        if not updated:
            return False
        JobEvent.objects.create(
            job_id=job.pk,
            created_at=now,
            actor=actor if actor is not None and actor.is_authenticated else None,
            from_status=current,
            to_status=to_status,
            reason=reason[:300],
            data=data or {},
        )
        publish_on_commit(job)
    job.status = to_status
    for name, value in fields.items():
        setattr(job, name, value)
    return True


def publish_on_commit(job: Job, *, created: bool = False) -> None:
    """Push the job's new state to its page, the job list and the dashboard once committed
    (jobs.live). Registered inside the transaction, so a rollback publishes nothing."""
    from jobs import live  # rendering pulls in templates and the channel layer: load lazily

    transaction.on_commit(lambda: live.publish_job(job, created=created))


def do_set_progress(
    job: Job,
    *,
    stage: str,
    message: str = "",
    percent: int | None = None,
    token: uuid.UUID | None = None,
) -> bool:
    """Record how far a running job has got (no status change, no audit event) and publish
    it. With the run's `token`, only that run can write its progress."""
    fields: dict[str, Any] = {"stage": stage, "progress_message": message[:300]}
    if percent is not None:
        fields["progress_percent"] = max(0, min(100, int(percent)))
    return _update_run(job, token, fields)


def do_begin_attempt(job: Job) -> bool:
    """Count one more provider call for the job's current run (`job.run_token`) and show the
    stage "calling" with its number, in one UPDATE. False when the job is no longer this
    run's (cancelled, expired, recovered elsewhere): the call must not be made."""
    number = job.attempt_count + 1
    fields = {"stage": "calling", "progress_message": f"attempt {number}"}
    if not _update_run(job, job.run_token, fields, attempt_count=F("attempt_count") + 1):
        return False
    job.attempt_count = number
    return True


def _update_run(job: Job, token: uuid.UUID | None, fields: dict[str, Any], **db_only: Any) -> bool:
    """Write `fields` (and `db_only` expressions) to a running job, for the run holding
    `token` if given, and publish. One UPDATE without a transaction of its own (outside one,
    the publish runs at once). `fields` are set on the in-memory job too."""
    fence = {"run_token": token} if token is not None else {}
    updated = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, **fence).update(
        updated_at=timezone.now(), **fields, **db_only
    )
    if not updated:
        return False
    for name, value in fields.items():
        setattr(job, name, value)
    publish_on_commit(job)
    return True


def do_submit_job(
    *,
    workload: Workload,
    input_text: str,
    user: AbstractBaseUser | None,
    priority: str = "",
    idempotency_key: str = "",
    input_data: dict[str, Any] | None = None,
    batch: Any = None,
    parent: Job | None = None,
    chunk_index: int | None = None,
    max_input_chars: int = MAX_INPUT_CHARS,
    publish: bool = True,
    deadline: datetime | None = None,
    start_at: datetime | None = None,
) -> tuple[Job, bool]:
    """Persist a job and enqueue it once the row is committed.

    Returns (job, created). With an idempotency key seen from the same user in the last 24 h,
    returns the existing job and creates nothing. `input_data` holds named template fields
    (or a document's metadata); `batch`, `parent` and `chunk_index` say where the job came
    from (a CSV batch row, a document chunk: see batches/ and jobs/documents.py).
    """
    if not input_text.strip():
        raise SubmitError("Input is empty.")
    if len(input_text) > max_input_chars:
        raise SubmitError(f"Input is longer than {max_input_chars:,} characters.")
    if workload.is_paused:
        raise SubmitError(f"Workload {workload.name!r} is paused; try again later.")
    if priority and priority not in Priority.values:
        raise SubmitError(f"Unknown priority {priority!r}.")
    _check_times(deadline, start_at)
    idempotency_key = idempotency_key.strip()[:200]
    submitter = user if user is not None and user.is_authenticated else None

    if idempotency_key:
        existing = _find_idempotent(submitter, idempotency_key)
        if existing is not None:
            return existing, False

    now = timezone.now()
    job = Job(
        workload=workload,
        submitted_by=submitter,
        input_text=input_text,
        priority=priority or workload.default_priority,
        idempotency_key=idempotency_key,
        status=Job.Status.QUEUED,
        stage="queued",
        created_at=now,
        queued_at=now,
        input_data=input_data or {},
        batch=batch,
        parent=parent,
        chunk_index=chunk_index,
        deadline=deadline,
        # The prompt template it will run with (jobs.kinds records a newer one at run time).
        template_version=workload.template_version,
    )
    try:
        with transaction.atomic():
            if batch is None and parent is None:
                # A batch or a document's chunks were admitted as one submission.
                refusal = backpressure.check(workload)
                if refusal is not None:
                    raise Overloaded(refusal.message, retry_after=refusal.retry_after)
            job.save()
            reason = _admit_at_submit(job, start_at)
            JobEvent.objects.create(
                job=job,
                created_at=now,
                actor=submitter,
                to_status=job.status,
                reason=reason,
            )
            if job.status == Job.Status.QUEUED:
                transaction.on_commit(lambda: queueing.enqueue(job))
            elif job.status == Job.Status.SCHEDULED:
                transaction.on_commit(lambda: queueing.enqueue_at(job, job.resume_at))
            if publish:  # batch waves skip it: their page polls, and a wave is 100s of jobs
                publish_on_commit(job, created=True)
    except IntegrityError:
        # Two submissions with the same key raced; the other one won. Return it.
        existing = _find_idempotent(submitter, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    return job, True


def local_time(moment: datetime) -> str:
    """A moment as people read it in wait reasons: date, minutes and the zone (settings)."""
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M %Z}"


def _check_times(deadline: datetime | None, start_at: datetime | None) -> None:
    now = timezone.now()
    if deadline is not None and deadline <= now:
        raise SubmitError("The deadline is in the past.")
    if deadline is not None and start_at is not None and start_at >= deadline:
        raise SubmitError("The start time must be before the deadline.")


def _admit_at_submit(job: Job, start_at: datetime | None) -> str:
    """Inside the submit transaction: reserve the job's worst-case cost, then decide its
    first status (queued, scheduled for `start_at`, or held by an exhausted budget). A
    rejecting budget raises, rolling back the row. Returns the audit reason."""
    try:
        exhausted = budgets.reserve_for(job)
    except budgets.CannotEstimate as exc:
        raise SubmitError(f"Not submitted: {exc}") from exc
    fields: dict[str, Any] = {}
    reason = "submitted"
    if exhausted is not None:
        need = budgets.estimate_for(job).nanos
        never = budgets.never_fits_message(exhausted, need)
        if exhausted.on_exhausted == Budget.OnExhausted.REJECT:
            if never is not None:  # not "try later": no renewal lets it in
                raise SubmitError(
                    f"Not submitted: {never}, or once the workload's max output tokens or the "
                    "input are made smaller."
                )
            raise Overloaded(
                budgets.reject_message(exhausted),
                retry_after=budgets.seconds_until_renewal(exhausted),
            )
        why = budgets.hold_reason(exhausted, need)
        fields = {"status": Job.Status.HELD, "stage": "held", "wait_reason": why[:200]}
        reason = f"submitted; {why}"
    elif start_at is not None and start_at > timezone.now():
        fields = {
            "status": Job.Status.SCHEDULED,
            "stage": "scheduled",
            "wait_reason": f"scheduled to start at {local_time(start_at)}"[:200],
            "resume_at": start_at,
        }
        reason = "submitted; scheduled"
    if start_at is not None:
        fields["scheduled_for"] = start_at
    if fields:
        Job.objects.filter(pk=job.pk).update(**fields)
        for name, value in fields.items():
            setattr(job, name, value)
    return reason


def do_expire_job(job: Job, *, reason: str = "deadline passed") -> bool:
    """A job that has not started by its deadline expires: it never runs, and what it
    reserved on its budgets is given back. A document waiting for its chunks expires too, and
    they are cancelled (`stop_chunks`)."""
    won = transition(
        job,
        [Job.Status.QUEUED, Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED],
        Job.Status.EXPIRED,
        reason=reason,
        stage="done",
        finished_at=timezone.now(),
        run_token=None,
    )
    if won:
        budgets.release(job)
        transaction.on_commit(lambda: queueing.remove(job))
        stop_chunks(job, actor=None, reason="its document expired")
    return won


def _find_idempotent(user: AbstractBaseUser | None, key: str) -> Job | None:
    existing = Job.objects.filter(submitted_by=user, idempotency_key=key).first()
    if existing is None:
        return None
    if existing.created_at >= timezone.now() - IDEMPOTENCY_WINDOW:
        return existing
    # An expired key is released so it can be used again.
    Job.objects.filter(pk=existing.pk, idempotency_key=key).update(idempotency_key="")
    return None


def do_start_run(job: Job, *, worker: str = "") -> uuid.UUID | None:
    """queued → running. Returns the run's fencing token, or None if the job is not runnable."""
    token = uuid.uuid4()
    now = timezone.now()
    won = transition(
        job,
        [Job.Status.QUEUED],
        Job.Status.RUNNING,
        reason="started",
        data={"worker": worker} if worker else None,
        run_token=token,
        heartbeat_at=now,
        started_at=now,
        stage="calling",
        progress_message="",
    )
    return token if won else None


def do_finish_run(
    job: Job,
    token: uuid.UUID,
    *,
    output_text: str,
    confidence: float | None,
) -> bool:
    return _end_run(
        job,
        token,
        Job.Status.SUCCEEDED,
        reason="completed",
        output_text=output_text,
        confidence=confidence,
        error="",
        error_class="",
        progress_percent=100,
    )


def do_fail_run(job: Job, token: uuid.UUID, *, error: str, error_class: str) -> bool:
    return _end_run(
        job,
        token,
        Job.Status.FAILED,
        reason=error[:300],
        data={"error_class": error_class},
        error=error,
        error_class=error_class,
    )


def do_expire_run(job: Job, token: uuid.UUID) -> bool:
    """running → expired: the run passed the job's deadline. Only that run's token can expire
    it; its in-flight call is abandoned and a late answer is discarded by the fence. What
    the job holds on its budgets is given back once the run lets go (jobs.admission.finish)."""
    return _end_run(job, token, Job.Status.EXPIRED, reason="deadline passed while running")


def _end_run(job: Job, token: uuid.UUID, to_status: str, *, reason: str, **fields: Any) -> bool:
    """running → a final status, for the run holding `token` only (the fence)."""
    return transition(
        job,
        [Job.Status.RUNNING],
        to_status,
        reason=reason,
        extra_filter={"run_token": token},
        stage="done",
        finished_at=timezone.now(),
        run_token=None,
        **fields,
    )


def do_hold_run(job: Job, token: uuid.UUID, *, reason: str) -> bool:
    """running → held: the run's next call does not fit the job's budget. What the job still
    reserved is given back now; `budgets.release_held` reserves again and resumes it, in
    priority order, when the budget frees (cap raised, period rolled over)."""
    with transaction.atomic():
        won = transition(
            job,
            [Job.Status.RUNNING],
            Job.Status.HELD,
            reason=reason,
            extra_filter={"run_token": token},
            wait_reason=reason[:200],
            stage="held",
            progress_message=reason[:300],
            run_token=None,
        )
        if won:
            budgets.release(job)
    return won


def do_cancel_job(job: Job, *, actor: AbstractBaseUser | None, reason: str = "") -> bool:
    """Cancel a job that has not finished. A running job's worker sees the new status at its
    next heartbeat (a streamed call is cut there) or before its next call, and a late result
    is discarded by the fencing token. A document's chunks that have not finished are
    cancelled with it (`stop_chunks`): nobody wants what they would cost."""
    won = transition(
        job,
        Job.CANCELLABLE_STATUSES,
        Job.Status.CANCELLED,
        actor=actor,
        reason=reason or "cancelled",
        stage="done",
        finished_at=timezone.now(),
        run_token=None,
    )
    if won:
        # A running job's in-flight call still settles its actual cost when it lands.
        budgets.release(job)
        transaction.on_commit(lambda: queueing.remove(job))
        stop_chunks(job, actor=actor, reason="its document was cancelled")
    return won


def stop_chunks(job: Job, *, actor: AbstractBaseUser | None, reason: str) -> None:
    """A document ended without its result (cancelled, expired): cancel its chunks that have
    not finished, so they make no more calls, and withdraw those waiting for a reviewer, so
    nobody spends time (or, with a retry, money) on them. Nothing to do for any other job."""
    if job.parent_id is not None:
        return
    from review.services import do_withdraw  # review builds on this module

    statuses = {*Job.CANCELLABLE_STATUSES, Job.Status.NEEDS_REVIEW}
    open_chunks = Job.objects.filter(parent=job, status__in=statuses)
    for chunk in open_chunks.select_related("workload"):
        if chunk.status == Job.Status.NEEDS_REVIEW:
            do_withdraw(chunk, actor, reason=reason)
        else:
            do_cancel_job(chunk, actor=actor, reason=reason)


def do_recover_stale_run(job: Job, *, reason: str) -> bool:
    """running → queued for a run whose worker stopped heart-beating, then enqueue again."""
    won = transition(
        job,
        [Job.Status.RUNNING],
        Job.Status.QUEUED,
        reason=reason,
        extra_filter={"run_token": job.run_token} if job.run_token else None,
        run_token=None,
        stage="queued",
        progress_message="",
        queued_at=timezone.now(),
    )
    if won:
        transaction.on_commit(lambda: queueing.enqueue(job))
    return won


def do_park_job(
    job: Job,
    *,
    reason: str,
    resume_at: datetime,
    token: uuid.UUID | None = None,
    status: str = Job.Status.WAITING,
) -> bool:
    """Set a job aside until `resume_at` without holding a worker: queued → waiting (admission
    found no capacity) or, with the run's `token`, running → waiting (a long Retry-After, an
    open breaker). RQ's scheduler puts it back on its queue at `resume_at`."""
    if token is not None:
        from_statuses, extra = [Job.Status.RUNNING], {"run_token": token}
    else:
        from_statuses, extra = [Job.Status.QUEUED], None
    won = transition(
        job,
        from_statuses,
        status,
        reason=reason,
        data={"resume_at": resume_at.isoformat()},
        extra_filter=extra,
        wait_reason=reason[:200],
        resume_at=resume_at,
        run_token=None,
        stage=status,
        progress_message=reason[:300],
    )
    if won:
        transaction.on_commit(lambda: queueing.enqueue_at(job, resume_at))
    return won


def do_resume_job(
    job: Job,
    *,
    reason: str = "resumed",
    actor: AbstractBaseUser | None = None,
    enqueue: bool = True,
) -> bool:
    """waiting / held / scheduled → queued. With `enqueue`, also put it on its queue (a worker
    that resumes the job it is about to run passes False)."""
    won = transition(
        job,
        [Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED],
        Job.Status.QUEUED,
        actor=actor,
        reason=reason,
        wait_reason="",
        resume_at=None,
        stage="queued",
        progress_message="",
        queued_at=timezone.now(),
    )
    if won and enqueue:
        transaction.on_commit(lambda: queueing.enqueue(job))
    return won
