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

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.utils import timezone

from jobs import inputs, ledger, live, processes, queueing, replay
from jobs.documents import Document
from jobs.flow import backpressure, budgets, retry_budget
from jobs.models import ApiToken, Budget, Job, JobEvent, Priority, Provider, Workload
from jobs.signals import job_settled, job_stopped

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


# What `transition()` announces on commit (jobs.signals): a run ended with an answer to act on;
# a job ended without its result.
SETTLED_STATUSES = frozenset({Job.Status.SUCCEEDED, Job.Status.NEEDS_REVIEW, Job.Status.FAILED})
STOPPED_STATUSES = frozenset({Job.Status.CANCELLED, Job.Status.EXPIRED})


class Paused(Overloaded):
    """Refused because an operator paused the workload: nobody can say when it resumes, so the
    API answers 503 with a Retry-After of PAUSED_RETRY_AFTER seconds, a polite polling pace."""


PAUSED_RETRY_AFTER = 60


class IdempotencyConflict(SubmitError):
    """The idempotency key was used before for a different request (another workload, input,
    priority or time): answering with that job would hide the client's bug. The API answers 422,
    as the IETF Idempotency-Key draft says."""

    def __init__(self, message: str, *, job: Job) -> None:
        super().__init__(message)
        self.job = job


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
        if to_status in SETTLED_STATUSES:
            transaction.on_commit(lambda: job_settled.send(sender=Job, job=job, status=to_status))
        elif to_status in STOPPED_STATUSES:
            transaction.on_commit(
                lambda: job_stopped.send(
                    sender=Job, job=job, status=to_status, actor=actor, reason=reason
                )
            )
    job.status = to_status
    for name, value in fields.items():
        setattr(job, name, value)
    return True


def publish_on_commit(job: Job, *, created: bool = False) -> None:
    """Push the job's new state to its page, the job list and the dashboard once committed
    (jobs.live). Registered inside the transaction, so a rollback publishes nothing."""
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
    replay_of: Job | None = None,
    api_token: ApiToken | None = None,
) -> tuple[Job, bool]:
    """Persist a job and enqueue it once the row is committed.

    Returns (job, created). With an idempotency key seen from the same user in the last 24 h,
    returns the existing job and creates nothing. `input_data` holds named template fields
    (or a document's metadata); `batch`, `parent` and `chunk_index` say where the job came
    from (a CSV batch row, a document chunk: see batches/ and jobs/documents.py).
    """
    if not input_text.strip():
        raise SubmitError("Input is empty.")
    if problem := inputs.text_problem(input_text):  # no database can store it
        raise SubmitError(f"The input {problem}.")
    if len(input_text) > max_input_chars:
        raise SubmitError(f"Input is longer than {max_input_chars:,} characters.")
    if priority and priority not in Priority.values:
        raise SubmitError(f"Unknown priority {priority!r}.")
    _check_times(deadline, start_at)
    idempotency_key = idempotency_key.strip()[:200]
    submitter = user if user is not None and user.is_authenticated else None

    if idempotency_key:
        existing = _find_idempotent(submitter, idempotency_key)
        if existing is not None:
            _check_same_request(existing, workload, input_text, priority, deadline, start_at)
            return existing, False

    # After the key's lookup: a client retrying a submission that was taken before the pause
    # gets its job, not a refusal.
    if workload.is_paused:
        raise Paused(
            f"Workload {workload.name!r} is paused; try again later.",
            retry_after=PAUSED_RETRY_AFTER,
        )

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
        replay_of=replay_of,
        api_token=api_token,
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
        _check_same_request(existing, workload, input_text, priority, deadline, start_at)
        return existing, False
    return job, True


def _check_same_request(
    job: Job,
    workload: Workload,
    input_text: str,
    priority: str,
    deadline: datetime | None,
    start_at: datetime | None,
) -> None:
    """Raise IdempotencyConflict unless `job` was submitted with what this request asks for.
    Named fields are rendered into `input_text`, so comparing it covers them; a priority left
    out means the workload's default, as at submission."""
    differs = [
        name
        for name, same in (
            ("workload", job.workload_id == workload.pk),
            ("input", job.input_text == input_text),
            ("priority", job.priority == (priority or workload.default_priority)),
            ("deadline", job.deadline == deadline),
            ("start_at", job.scheduled_for == start_at),
        )
        if not same
    ]
    if differs:
        raise IdempotencyConflict(
            f"This idempotency key was used for job {job.code} with a different "
            f"{', '.join(differs)}; use a new key for a new request.",
            job=job,
        )


def do_resubmit_job(
    job: Job,
    *,
    user: AbstractBaseUser | None,
    idempotency_key: str = "",
    priority: str = "",
    deadline: datetime | None = None,
    start_at: datetime | None = None,
    api_token: ApiToken | None = None,
) -> tuple[Job, bool]:
    """A new job with `job`'s workload and input (its named fields too), linked to it by
    `replay_of`; it is a submission like any other (idempotency key, backpressure, budgets,
    a paused workload). The original is left as it is. Returns (job, created)."""
    if job.workload.kind == Workload.Kind.DOCUMENT or job.parent_id is not None:
        raise SubmitError("A document's job is replayed by uploading the document again.")
    return do_submit_job(
        workload=job.workload,
        input_text=job.input_text,
        input_data=job.input_data or None,
        user=user,
        priority=priority or job.priority,
        idempotency_key=idempotency_key,
        deadline=deadline,
        start_at=start_at,
        replay_of=job,
        api_token=api_token,
    )


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
        fields = {
            "status": Job.Status.HELD,
            "stage": "held",
            "wait_reason": why[:200],
            "wait_kind": Job.WaitKind.BUDGET,
        }
        reason = f"submitted; {why}"
    elif start_at is not None and start_at > timezone.now():
        fields = {
            "status": Job.Status.SCHEDULED,
            "stage": "scheduled",
            "wait_reason": f"scheduled to start at {local_time(start_at)}"[:200],
            "wait_kind": Job.WaitKind.SCHEDULED,
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


def do_expire_job(job: Job, *, reason: str = "deadline passed", error: str = "") -> bool:
    """A job that has not started by its deadline expires: it never runs, and what it
    reserved on its budgets is given back. A document waiting for its chunks expires too, and
    they are cancelled (`stop_chunks`). `error`, if given, is shown on the job (what the
    provider did while the job waited for it: runs.retries.expiry_for)."""
    won = transition(
        job,
        [Job.Status.QUEUED, Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED],
        Job.Status.EXPIRED,
        reason=reason,
        stage="done",
        finished_at=timezone.now(),
        run_token=None,
        **({"error": error} if error else {}),
    )
    if won:
        release_budget(job)
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
        run_by=processes.identity(),
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


def do_expire_run(
    job: Job,
    token: uuid.UUID,
    *,
    reason: str = "deadline passed while running",
    error: str = "",
) -> bool:
    """running → expired: the run passed the job's deadline. Only that run's token can expire
    it; its in-flight call is abandoned and a late answer is discarded by the fence. What
    the job holds on its budgets is given back once the run lets go (runs.admission.finish)."""
    fields = {"error": error} if error else {}
    return _end_run(job, token, Job.Status.EXPIRED, reason=reason, **fields)


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


def do_hold_run(
    job: Job, token: uuid.UUID, *, reason: str, kind: str = Job.WaitKind.BUDGET
) -> bool:
    """running → held: the run's next call does not fit the job's budget (or its provider is
    out of credit). What the job still reserved is given back now; `do_release_held`
    reserves again and resumes it, in priority order, when the budget frees (cap raised,
    period rolled over)."""
    return do_hold_job(job, reason=reason, token=token, kind=kind)


def do_hold_job(
    job: Job,
    *,
    reason: str,
    token: uuid.UUID | None = None,
    kind: str = Job.WaitKind.BUDGET,
) -> bool:
    """queued → held before it runs (its provider is out of credit: jobs.credit), or,
    with the run's `token`, running → held (`do_hold_run`). What it reserved is given back."""
    if token is not None:
        from_status, extra = Job.Status.RUNNING, {"extra_filter": {"run_token": token}}
    else:
        from_status, extra = Job.Status.QUEUED, {}
    with transaction.atomic():
        won = transition(
            job,
            [from_status],
            Job.Status.HELD,
            reason=reason,
            data={"wait_kind": kind},
            wait_reason=reason[:200],
            wait_kind=kind,
            stage="held",
            progress_message=reason[:300],
            run_token=None,
            **extra,
        )
        if won:
            release_budget(job)
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
        release_budget(job)
        transaction.on_commit(lambda: queueing.remove(job))
        stop_chunks(job, actor=actor, reason="its document was cancelled")
    return won


def stop_chunks(job: Job, *, actor: AbstractBaseUser | None, reason: str) -> None:
    """A document ended without its result (cancelled, expired): cancel its chunks that have
    not finished, so they make no more calls, and those waiting for a reviewer (the inbox
    withdraws their items on `job_stopped`), so nobody spends time (or, with a retry, money)
    on them. Nothing to do for any other job."""
    if job.parent_id is not None:
        return
    statuses = {*Job.CANCELLABLE_STATUSES, Job.Status.NEEDS_REVIEW}
    open_chunks = Job.objects.filter(parent=job, status__in=statuses)
    for chunk in open_chunks.select_related("workload"):
        if chunk.status == Job.Status.NEEDS_REVIEW:
            transition(
                chunk,
                [Job.Status.NEEDS_REVIEW],
                Job.Status.CANCELLED,
                actor=actor,
                reason=reason,
                stage="done",
                progress_percent=100,
                progress_message="",
                finished_at=timezone.now(),
            )
        else:
            do_cancel_job(chunk, actor=actor, reason=reason)


def do_recover_stale_run(job: Job, *, reason: str, lost_calls: str = "its worker was lost") -> bool:
    """running → queued for a run whose worker died, stalled or stopped, then enqueue again.
    Its calls still in flight are settled as outcome unknown, charged at their reservation
    (`jobs.ledger.lose`; `lost_calls` says why), in the same transaction: either the run is
    recovered and its calls are charged, or neither."""
    with transaction.atomic():
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
            ledger.lose(job, why=lost_calls)
    if won:
        transaction.on_commit(lambda: queueing.enqueue_recovered(job))
    return won


def do_park_job(
    job: Job,
    *,
    reason: str,
    resume_at: datetime,
    kind: str,
    wait_on: str = "",
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
        data={"resume_at": resume_at.isoformat(), "wait_kind": kind},
        extra_filter=extra,
        wait_reason=reason[:200],
        wait_kind=kind,
        wait_on=wait_on,
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
    statuses: Iterable[str] = (Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED),
) -> bool:
    """waiting / held / scheduled (or only `statuses`) → queued. With `enqueue`, also put it
    on its queue (a worker that resumes the job it is about to run passes False)."""
    won = transition(
        job,
        statuses,
        Job.Status.QUEUED,
        actor=actor,
        reason=reason,
        wait_reason="",
        wait_kind="",
        wait_on="",
        resume_at=None,
        stage="queued",
        progress_message="",
        queued_at=timezone.now(),
    )
    if won and enqueue:
        transaction.on_commit(lambda: queueing.enqueue(job))
    return won


def do_submit_document(
    *,
    workload: Workload,
    document: Document,
    user: AbstractBaseUser | None,
    priority: str = "",
    idempotency_key: str = "",
    start_at: datetime | None = None,
    deadline: datetime | None = None,
) -> tuple[Job, bool]:
    """Submit an uploaded document (jobs.documents extracted its text) as one document job."""
    return do_submit_job(
        workload=workload,
        input_text=document.text,
        user=user,
        priority=priority,
        idempotency_key=idempotency_key,
        start_at=start_at,
        deadline=deadline,
        input_data=document.metadata,
        max_input_chars=settings.AIQUEUE_DOCUMENT_MAX_CHARS,
    )


def do_note_template_version(job: Job) -> None:
    """Record which version of its workload's prompt template the job's run uses."""
    version = job.workload.template_version
    if job.template_version != version:
        Job.objects.filter(pk=job.pk).update(template_version=version)
        job.template_version = version


def do_store_output(job: Job, token: uuid.UUID, output_data: Any) -> None:
    """The run's parsed output, written before its status change so the finished (or
    escalated) job is never seen without it; the run token keeps a stale run from writing."""
    if output_data is None and job.output_data is None:
        return  # nothing stored, nothing to store (read when the run began)
    Job.objects.filter(pk=job.pk, run_token=token).update(output_data=output_data)
    job.output_data = output_data


# --------------------------------------------------------------------------- budgets


def release_budget(job: Job | int) -> int:
    """`budgets.release`, and once committed let held jobs in that now fit. Returns the nanos
    released."""
    released = budgets.release(job)
    if released and Job.objects.filter(status=Job.Status.HELD).exists():
        # robust: the money given back is settled whatever releasing others does; an error
        # there is logged, and never fails the run or request that got here.
        transaction.on_commit(do_release_held, robust=True)
    return released


def do_try_release(
    job: Job, *, reason: str, actor=None, on: list[Budget] | None = None
) -> tuple[bool, Budget | None]:
    """Resume one held job if its reservation on its budgets (`on`, else its own) fits now.
    Returns (released, the budget that could not take it)."""
    job_budgets = budgets.budgets_for(job) if on is None else on
    try:
        cost = budgets.estimate_for(job)
    except budgets.CannotEstimate:
        cost = None
    with transaction.atomic():
        # Claim the job first: held → queued is a compare-and-set, so of two processes
        # releasing the same job (each read it as held) the second changes nothing and
        # reserves nothing. Not fitting rolls the claim back with the reservation.
        if not do_resume_job(job, reason=reason, actor=actor, statuses=[Job.Status.HELD]):
            return False, None  # released by another process, cancelled or expired meanwhile
        if job_budgets and cost is not None:
            full = budgets.reserve(job, cost.nanos, job_budgets)
            if full is not None:
                transaction.set_rollback(True)
                job.status = Job.Status.HELD
                return False, full
    return True, None


def do_release_held(limit: int = budgets.RELEASE_HELD_BATCH) -> int:
    """Reserve for held jobs that now fit and resume them, highest priority first, then
    oldest first. A job that does not fit blocks lower-ranked jobs on the same budget, so a
    big high-priority job is not overtaken forever by small low-priority ones."""
    held = list(
        Job.objects.filter(status=Job.Status.HELD)
        # Held for their provider's credit (jobs.credit): they wait for an operator.
        .exclude(workload__provider__out_of_credit_since__isnull=False)
        .select_related("workload__provider", "workload__fallback_provider")
        .order_by("created_at", "id")[: limit * 5]
    )
    held.sort(key=lambda j: (budgets.PRIORITY_RANK.get(j.priority, 1), j.created_at, j.id))
    blocked: set[int] = set()
    resumed = 0
    for job in held[:limit]:
        job_budgets = budgets.budgets_for(job)
        if blocked.intersection(b.pk for b in job_budgets):
            continue
        released, full = do_try_release(
            job, reason="budget freed: released from hold", on=job_budgets
        )
        if full is not None:
            blocked.add(full.pk)
        resumed += released
    return resumed


@receiver(post_save, sender=Budget, dispatch_uid="budgets-release-held")
def _budget_saved(sender, instance: Budget, **kwargs) -> None:
    # A raised cap (or a new period) may let held jobs in: try once the change is committed.
    transaction.on_commit(do_release_held, robust=True)


# --------------------------------------------------------------------------- wake-ups

PAUSED_REASON = "workload paused"


def wake_paused(workload: Workload, *, actor=None) -> int:
    """Resume the jobs that were parked because the workload was paused."""
    woken = 0
    parked = Job.objects.filter(
        workload=workload, status=Job.Status.WAITING, wait_kind=Job.WaitKind.PAUSED
    ).select_related("workload")
    for job in parked.order_by("created_at", "id"):
        if do_resume_job(job, reason="workload resumed", actor=actor):
            woken += 1
    return woken


def breaker_wait_reason(provider: Provider) -> str:
    return f"circuit breaker open for {provider.name}"


def provider_wait_on(provider: Provider) -> str:
    """The `wait_on` of a job waiting for this provider's breaker."""
    return f"provider:{provider.pk}"


def wake_breaker_waiters(provider: Provider, limit: int = 1000, *, reason: str = "") -> int:
    """Send jobs parked on the provider's breaker back to their queues now instead of at
    their resume times, oldest first. Returns how many were woken."""
    reason = reason or f"circuit breaker for {provider.name} closed"
    waiting = (
        Job.objects.filter(
            status=Job.Status.WAITING,
            wait_kind=Job.WaitKind.BREAKER,
            wait_on=provider_wait_on(provider),
        )
        .select_related("workload")
        .order_by("created_at", "id")[:limit]
    )
    woken = 0
    for job in waiting:
        if do_resume_job(job, reason=reason):
            woken += 1
    if woken:
        log.info("breaker for %s: woke %d waiting jobs", provider.name, woken)
    return woken


def wake_budget_waiters(provider: Provider, codes: list[str]) -> int:
    """Resume the jobs popped from the retry budget's wait list (those still waiting)."""
    woken = 0
    for code in codes:
        job = Job.objects.select_related("workload").filter(code=code).first()
        if job is None or job.status != Job.Status.WAITING:
            continue  # cancelled, finished, or already back by its fallback wake-up
        # Drop its fallback wake-up first, so the RQ id is not queued twice.
        queueing.remove(job)
        if do_resume_job(job, reason=f"retry budget of {provider.name} has room"):
            woken += 1
    return woken


def provider_recovered(provider: Provider) -> int:
    """The provider's breaker closed (its probes succeeded, or an operator reset it): the
    retries that failed before no longer count against its budget, and the jobs parked on
    the breaker go back to their queues. Returns how many jobs were woken."""
    woken = wake_budget_waiters(provider, retry_budget.forgive(provider))
    return woken + wake_breaker_waiters(provider)


def do_replay_job(
    job: Job, *, actor: AbstractBaseUser | None, overrides: dict[str, Any] | None = None
) -> Job:
    """Run a finished job (or one waiting for review) again: the same Job goes back to the
    queue, with `overrides` (jobs.replay.OVERRIDE_KEYS) over the ones it had, and its next
    call is the next attempt in its history. Its worst-case cost is reserved on its budgets in
    the same transaction, as at submit: over an exhausted budget it is held (and resumed when
    the budget frees), or refused for a budget that rejects. Audited as a JobEvent with the
    actor and the overrides. Raises `replay.ReplayError` when refused (nothing changes then).
    """
    if problem := replay.why_not_replayable(job):
        raise replay.ReplayError(problem)
    extra = replay.clean_overrides(overrides)
    merged = {**(job.overrides or {}), **extra}
    from_status = job.status
    now = timezone.now()
    fields: dict[str, Any] = {
        **replay.fresh_run_fields(),
        "overrides": merged,
        "is_human_approved": False,
        "wait_reason": "",
        "wait_kind": "",
        "wait_on": "",
        "resume_at": None,
        "scheduled_for": None,
        "finished_at": None,
        "run_token": None,
    }
    if job.is_past_deadline(now):
        fields["deadline"] = None  # it would expire at once: the replay is asked for now
    try:
        with transaction.atomic():
            number = replay.replays_so_far(job) + 1
            data: dict[str, Any] = {"replay": number, "overrides": extra}
            if "deadline" in fields:
                data["deadline_dropped"] = job.deadline.isoformat()
            if not transition(
                job,
                [from_status],
                Job.Status.QUEUED,
                actor=actor,
                reason=f"replayed (run {number + 1})",
                data=data,
                **fields,
            ):
                raise replay.ReplayError("The job changed meanwhile; look at it again.")
            replay.job_replayed.send(sender=Job, job=job, actor=actor)
            job.cost_reserved = (
                Job.objects.filter(pk=job.pk).values_list("cost_reserved", flat=True).get()
            )
            try:
                exhausted = budgets.reserve_for(job)
            except budgets.CannotEstimate as exc:
                raise replay.ReplayError(f"Not replayed: {exc}") from exc
            if exhausted is None:
                transaction.on_commit(lambda: queueing.enqueue(job))
            elif exhausted.on_exhausted == Budget.OnExhausted.REJECT:
                raise replay.ReplayError(f"Not replayed: {budgets.reject_message(exhausted)}")
            else:
                need = budgets.estimate_for(job).nanos
                do_hold_job(job, reason=budgets.hold_reason(exhausted, need))
    except replay.ReplayError:
        job.refresh_from_db()  # the in-memory job was changed by the rolled-back transition
        raise
    return job


def do_replay_jobs(
    jobs: Iterable[Job], *, actor: AbstractBaseUser | None, overrides: dict[str, Any] | None = None
) -> tuple[int, list[str]]:
    """Replay each job through `do_replay_job`, each in its own transaction, so one refusal
    does not undo the others. Returns (replayed, why each other one was not)."""
    replayed, skipped = 0, []
    for job in jobs:
        try:
            do_replay_job(job, actor=actor, overrides=overrides)
        except replay.ReplayError as exc:
            skipped.append(f"{str(job.code)[:8]}: {exc}")
        else:
            replayed += 1
    return replayed, skipped


# `Job.overrides` key: an operator asked the job to run now, so admission does not defer it to
# the off-peak window again (runs.admission).
RUN_NOW = "run_now"


def do_run_now(job: Job, *, actor: AbstractBaseUser | None) -> bool:
    """scheduled / waiting → queued at once, for an operator who will not wait for its start
    time, the off-peak window or its next check. Admission still decides: a cap that is full,
    a rate limit or an open breaker parks it again, with the reason. False if it was neither
    scheduled nor waiting any more."""
    fields: dict[str, Any] = {}
    if job.workload.is_deferrable:
        fields["overrides"] = {**(job.overrides or {}), RUN_NOW: True}
    with transaction.atomic():
        won = transition(
            job,
            [Job.Status.SCHEDULED, Job.Status.WAITING],
            Job.Status.QUEUED,
            actor=actor,
            reason="run now by an operator",
            wait_reason="",
            wait_kind="",
            wait_on="",
            resume_at=None,
            scheduled_for=None,
            stage="queued",
            progress_message="",
            queued_at=timezone.now(),
            **fields,
        )
    if won:
        transaction.on_commit(lambda: _enqueue_instead_of_wake_up(job))
    return won


def _enqueue_instead_of_wake_up(job: Job) -> None:
    queueing.remove(job)  # its timed wake-up first, so the RQ id is not queued twice
    queueing.enqueue(job)
