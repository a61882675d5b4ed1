"""Running one job: start the run, call the provider, record the attempt, finish the job.

The RQ task (runs.tasks.run_job) is a thin wrapper around `execute()`. Everything a run
decides is written to the database; nothing here keeps state another process needs.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from jobs import costs, documents, kinds, ledger, live, prepared, services
from jobs.flow import budgets
from jobs.models import Attempt, Job, Provider, Workload
from jobs.providers.base import (
    CallAborted,
    CallHandle,
    Completion,
    CompletionRequest,
    DeltaCallback,
    ProviderError,
    structured_confidence,
)
from jobs.providers.registry import get_provider
from runs import admission, dbconn, heartbeats, joblog, mapreduce, outcomes, retries, shutdown

log = logging.getLogger(__name__)


def execute(code: str, *, worker: str = "") -> str:
    """Run the job with this code if it is still queued. Returns the job's final status."""
    # Every log line of this run, from any module, carries job=<code> (runs.joblog).
    with joblog.job_context(code):
        return _execute(code, worker=worker)


def _execute(code: str, *, worker: str = "") -> str:
    job = _read_job(code)
    if job is None:
        log.warning("job=%s not found; dropping its queue entry", code)
        return "missing"
    if (
        job.status in (Job.Status.WAITING, Job.Status.SCHEDULED)
        and job.resume_at
        and job.resume_at <= timezone.now()
    ):
        # Its scheduled wake-up: back to queued, and this worker runs it now.
        services.do_resume_job(job, reason="resume time reached", enqueue=False)
    if job.status != Job.Status.QUEUED:
        # Cancelled, expired, still waiting, or already run elsewhere (a duplicate queue
        # entry): nothing to do.
        return job.status
    # Deadline, schedule, pause, off-peak, concurrency caps, rate limits (runs.admission):
    # a job that may not run now is parked there and this worker moves on.
    lease = admission.admit(job)
    if lease is None:
        return job.status
    token = None
    try:
        token = services.do_start_run(job, worker=worker)
        if token is None:
            return Job.objects.get(pk=job.pk).status
        stop = RunStop.start(token)
        try:
            with heartbeat(job, token, on_beat=lease.renew, on_lost=stop.set):
                _run(job, token, stop)
        finally:
            RunStop.end(token)
        if job.status == Job.Status.RUNNING:
            # The run did not end its job: the row moved on under it (cancelled, expired,
            # recovered). Pages last heard of it at that change, before this run's call was
            # settled: show them the ledger as it is now.
            services.publish_on_commit(job)
    finally:
        # Free the slots, wake the next waiter, give back an unspent reservation: whatever
        # ended the run (BaseException included: timeouts, shutdown).
        admission.finish(job, lease, ran=token is not None)
    if token is not None and job.status == Job.Status.RUNNING:
        # The run ended without moving its job on itself: cancelled, or recovered while it
        # ran (its worker stalled) and so queued again under the same RQ id (runs.worker).
        current = Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()
        return current if current in Job.TERMINAL_STATUSES else LOST
    return job.status


# The run's first read, `select_related("workload__provider", "submitted_by")` written out once
# per process (jobs.prepared): compiling it was half of its cost.
JOB_TO_RUN = prepared.Select(
    [
        (Job, None),
        (Workload, "workload"),
        (Provider, "workload__provider"),
        (get_user_model(), "submitted_by"),
    ],
    "t0.code = %s",
)
_CODE = Job._meta.get_field("code")


def _read_job(code: str) -> Job | None:
    try:
        value = uuid.UUID(code)
    except ValueError:
        return None
    connection = connections[DEFAULT_DB_ALIAS]
    return JOB_TO_RUN.get([_CODE.get_db_prep_value(value, connection)])


# What execute() returns for a run whose job was taken from it (recovered, queued again).
LOST = "lost"


class RunStop:
    """Set by the heartbeat when the run must stop (its job was cancelled, expired or
    recovered elsewhere). It aborts the run's call in flight (`CallHandle.abort`: its sockets
    are shut, streamed or not), so the call stops within a heartbeat interval instead of
    running, and being paid for, to its end; it is also checked at every streamed chunk.
    `call_provider` finds the run's stop by its fencing token."""

    _runs: dict[uuid.UUID, RunStop] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.reason: str | None = None
        self._call: CallHandle | None = None

    @classmethod
    def start(cls, token: uuid.UUID) -> RunStop:
        stop = cls()
        with cls._lock:
            cls._runs[token] = stop
        return stop

    @classmethod
    def end(cls, token: uuid.UUID) -> None:
        with cls._lock:
            cls._runs.pop(token, None)

    @classmethod
    def of(cls, token: uuid.UUID | None) -> RunStop | None:
        with cls._lock:
            return cls._runs.get(token) if token is not None else None

    def set(self, reason: str) -> None:
        self.reason = reason
        if self._call is not None:
            self._call.abort(reason)

    def watch(self, call: CallHandle) -> None:
        """`call` is the run's call in flight now."""
        self._call = call
        if self.reason is not None:
            call.abort(self.reason)

    def check(self) -> None:
        if self.reason is not None:
            raise retries.RunEnded(self.reason)


def _run(job: Job, token: uuid.UUID, stop: RunStop | None = None) -> None:
    if documents.is_document_parent(job) and not mapreduce.ready_to_reduce(job, token):
        return  # the document's chunks were fanned out (or are still running): it waits
    request = build_request(job)
    # Streamed tokens go to the job's page as they arrive, throttled (jobs.live).
    stream = live.OutputStream(
        job,
        on_first=lambda: services.do_set_progress(
            job, stage="streaming", message=f"attempt {job.attempt_count}", token=token
        ),
        before=stop.check if stop is not None else None,
    )
    try:
        # The one retry layer: breaker, retry budget, backoff, parking (runs.retries).
        completion = retries.call_with_retries(
            job,
            token,
            request,
            primary=budgets.chosen_target(job.workload, job.overrides)[0],
            call=call_provider,
            on_delta=stream,
        )
    except retries.RunEnded:
        return  # parked (waiting, with its reason and resume time) or no longer this run's
    except ProviderError as exc:
        outcomes.fail(job, token, exc)
        return
    if completion.confidence is None:
        completion.confidence = structured_confidence(completion.text)
    stream.close()
    # Judging the answer takes no time (no stage of its own is shown for it); an extract
    # repair, the one slow part, shows "repairing".
    try:
        judge(job, token, completion)
    except retries.RunEnded:
        return  # cancelled or recovered before a repair call (extract)


def build_request(job: Job) -> CompletionRequest:
    # Per-kind prompt, labels, schema and streaming: jobs.kinds.
    services.do_note_template_version(job)
    request = kinds.build_request(job)
    # A reviewer's retry may override model, temperature and prompt (review.services.do_retry).
    overrides = job.overrides or {}
    request.model = overrides.get("model") or request.model
    request.user_prompt = overrides.get("prompt") or request.user_prompt
    request.temperature = overrides.get("temperature", request.temperature)
    return request


def judge(job: Job, token: uuid.UUID, completion: Completion) -> None:
    # Parse and validate per kind (one repair call for extract); then the review rules (low
    # confidence, sampling) decide between finishing and escalating: runs.outcomes.

    def repair_call(job: Job, request: CompletionRequest) -> Completion:
        # The extract repair goes through the same retry layer as the first call: breaker,
        # retry budget, backoff, the job's attempt limit (a parked repair raises RunEnded).
        return retries.call_with_retries(
            job,
            token,
            request,
            primary=budgets.chosen_target(job.workload, job.overrides)[0],
            call=call_provider,
        )

    outcomes.judge(job, token, completion, build_request(job), call=repair_call)


def call_provider(
    job: Job,
    request: CompletionRequest,
    on_delta: DeltaCallback | None = None,
    *,
    provider: Provider | None = None,
    read_timeout: float | None = None,
) -> Completion:
    """One provider call, recorded in the ledger whatever happens: its row is written before
    the request leaves and settled after, BaseException included (jobs.ledger).
    `on_delta` receives each chunk of text of a streamed answer as it arrives. `provider` is
    the one runs.retries chose (the fallback while the primary's breaker is open);
    `read_timeout` is clamped below what is left of the run's time."""
    workload = job.workload
    provider_row = provider or budgets.chosen_target(workload, job.overrides)[0]
    prompt_tokens = costs.request_input_tokens(request)
    # Before every call, first or retry: a run past its job's deadline expires the job, and a
    # cancelled or recovered one stops.
    if job.is_past_deadline():
        services.do_expire_run(job, job.run_token)
        raise retries.RunEnded("deadline passed while running")
    if job.cost_actual or not job.cost_reserved or documents.is_document_parent(job):
        # A paid call was made already and came out of the reservation, the job holds none
        # (sent back from review, where its reservation was given back), or this is a
        # document's reduce call, whose prompt (its chunks' answers, corrected ones too) is
        # known only now: make the reservation cover this call before it is made, or hold
        # the job until its budget frees.
        exhausted = budgets.top_up(job, min_tokens_in=prompt_tokens)
        if exhausted is not None:
            reason = budgets.hold_reason(exhausted)
            services.do_hold_run(job, job.run_token, reason=reason)
            raise retries.RunEnded(reason)
    if not services.do_begin_attempt(job):
        raise retries.RunEnded("the job is no longer this run's (cancelled or recovered)")
    # The write-ahead ledger (jobs.ledger): the row, with the call's worst case (its bound at
    # this model's price, jobs.costs) and deadline, is committed before the request leaves, so
    # a call cut off by a crash is still counted, at that worst case.
    bound = costs.call_bound(request)
    price = provider_row.price_for(request.model)
    attempt = ledger.open_attempt(
        job,
        provider=provider_row,
        model=request.model,
        reserved_cost=bound.cost(price) if price else Decimal(0),
        deadline_at=ledger.call_deadline(provider_row, read_timeout),
    )
    started = time.monotonic()
    completion: Completion | None = None
    error: BaseException | None = None
    streamed: list[str] = []
    cut_off = False

    def delta(text: str) -> None:
        streamed.append(text)
        if on_delta is not None:
            on_delta(text)

    api = get_provider(provider_row, read_timeout=read_timeout)
    stop = RunStop.of(job.run_token)
    if stop is not None:
        stop.watch(api.call)  # a cancel from now on aborts this call
    try:
        # The call waits seconds: give a pooled DB connection back meanwhile (runs.dbconn).
        dbconn.release_while_waiting()
        completion = api.complete(request, delta if on_delta is not None else None)
    except BaseException as exc:  # recorded below whatever ended the call, then re-raised
        error = exc
        if isinstance(exc, CallAborted | retries.RunEnded):
            # Aborted by the run's stop (cancel, expiry, recovery), or cut at a streamed chunk.
            cut_off = True
            reason = exc.reason if isinstance(exc, CallAborted) else str(exc)
            attempt.error_class = "cut_off"
            attempt.error_message = f"call cut off: {reason}"[:2000]
            if isinstance(exc, CallAborted):
                error = retries.RunEnded(reason)
                error.__cause__ = exc
        elif isinstance(exc, ProviderError):
            attempt.error_class = exc.error_class
            attempt.error_message = exc.message[:2000]
            attempt.http_status = exc.status
            attempt.is_billed = exc.billed
            if exc.usage is not None:  # a billed failure that reported its usage (a refusal)
                attempt.tokens_in, attempt.tokens_out = exc.usage
        else:
            attempt.error_class = type(exc).__name__
            attempt.error_message = str(exc)[:2000]
        # A call that failed while this process is stopping failed because of the stop (the
        # worker hands its run back): it does not use up one of the job's attempts.
        attempt.consumes_attempt = not shutdown.is_stopping()
    attempt.ended_at = timezone.now()
    attempt.latency_ms = int((time.monotonic() - started) * 1000)
    if completion is not None:
        attempt.http_status = completion.status
        attempt.tokens_in = completion.tokens_in
        attempt.tokens_out = completion.tokens_out
    elif cut_off:
        # The provider bills what it generated before it saw the connection close, which
        # nobody here knows: what it reported (a stream's input count comes first), else
        # the call's bound, what was reserved for it (jobs.costs).
        reported = api.call
        attempt.tokens_in = bound.tokens_in if reported.tokens_in is None else reported.tokens_in
        attempt.tokens_out = (
            bound.tokens_out if reported.tokens_out is None else reported.tokens_out
        )
    elif streamed and not (attempt.tokens_in or attempt.tokens_out):
        # Broken off mid-stream (timed out, an error chunk): the provider bills what it
        # generated. Estimated from the text received, as the usage report never came.
        attempt.tokens_in = prompt_tokens
        attempt.tokens_out = sum(costs.text_tokens(text) for text in streamed)
    if attempt.tokens_in or attempt.tokens_out:
        attempt.cost = price.cost(attempt.tokens_in, attempt.tokens_out) if price else 0
    attempt.job = job
    if ledger.settle(attempt) == Attempt.State.SUPERSEDED:
        # This run was given up for lost while the call was open (its worker stalled past the
        # call's deadline) and the job runs again elsewhere: the answer is paid, not used.
        raise retries.RunEnded("superseded: the job was recovered while this call was open")
    if error is not None:
        raise error
    return completion


@contextmanager
def heartbeat(
    job: Job,
    token: uuid.UUID,
    on_beat: Callable[[], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
):
    """Keep `heartbeat_at` fresh while the run is alive, so the reconciler can tell a slow
    job from one whose worker died. `on_beat` runs at each beat too (lease renewal);
    `on_lost(reason)` once the run must stop (runs.heartbeats: cancelled, expired,
    recovered)."""
    # One beat for all of the process's runs, one query (runs.heartbeats).
    beats = heartbeats.for_this_process()
    beats.add(job.pk, token, on_beat, on_lost)
    try:
        yield
    finally:
        beats.remove(token)
