"""Running one job: start the run, call the provider, record the attempt, finish the job.

The RQ task (jobs.tasks.run_job) is a thin wrapper around `execute()`. Everything a run
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

from django.conf import settings
from django.db import connection as db_connection
from django.db.models import F
from django.utils import timezone

from jobs import admission, dbconn, documents, heartbeats, joblog, kinds, live, retries, services
from jobs.flow import budgets
from jobs.models import Attempt, Job, Provider
from jobs.providers.base import (
    Completion,
    CompletionRequest,
    DeltaCallback,
    ProviderError,
    structured_confidence,
)
from jobs.providers.registry import get_provider
from review import rules as review_rules
from review import services as review_services

log = logging.getLogger(__name__)


def execute(code: str, *, worker: str = "") -> str:
    """Run the job with this code if it is still queued. Returns the job's final status."""
    # Every log line of this run, from any module, carries job=<code> (jobs.joblog).
    with joblog.job_context(code):
        return _execute(code, worker=worker)


def _execute(code: str, *, worker: str = "") -> str:
    try:
        # get(), not first(): the code is unique, and first() would compile an ORDER BY.
        job = Job.objects.select_related("workload__provider", "submitted_by").get(code=code)
    except Job.DoesNotExist:
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
    # Deadline, schedule, pause, off-peak, concurrency caps, rate limits (jobs.admission):
    # a job that may not run now is parked there and this worker moves on.
    lease = admission.admit(job)
    if lease is None:
        return job.status
    token = None
    try:
        token = services.do_start_run(job, worker=worker)
        if token is None:
            return Job.objects.get(pk=job.pk).status
        stop = RunStop()
        with heartbeat(job, token, on_beat=lease.renew, on_lost=stop.set):
            _run(job, token, stop)
    finally:
        # Free the slots, wake the next waiter, give back an unspent reservation: whatever
        # ended the run (BaseException included: timeouts, shutdown).
        admission.finish(job, lease, ran=token is not None)
    return job.status


class RunStop:
    """Set by the heartbeat when the run must stop (its job was cancelled, expired or
    recovered elsewhere); checked at every streamed chunk, so a streamed call is cut within a
    heartbeat interval instead of running to its end. A call that does not stream finishes
    and its answer is discarded by the fencing token."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason

    def check(self) -> None:
        if self.reason is not None:
            raise retries.RunEnded(self.reason)


def _run(job: Job, token: uuid.UUID, stop: RunStop | None = None) -> None:
    if documents.is_document_parent(job) and not documents.ready_to_reduce(job, token):
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
        # The one retry layer: breaker, retry budget, backoff, parking (jobs.retries).
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
        handle_failure(job, token, exc)
        return
    if completion.confidence is None:
        completion.confidence = structured_confidence(completion.text)
    stream.close()
    # Judging the answer takes no time (no stage of its own is shown for it); an extract
    # repair, the one slow part, shows "repairing".
    try:
        handle_output(job, token, completion)
    except retries.RunEnded:
        return  # cancelled or recovered before a repair call (extract)


def build_request(job: Job) -> CompletionRequest:
    # Per-kind prompt, labels, schema and streaming: jobs.kinds.
    request = kinds.build_request(job)
    # A reviewer's retry may override model, temperature and prompt (review.services.do_retry).
    overrides = job.overrides or {}
    request.model = overrides.get("model") or request.model
    request.user_prompt = overrides.get("prompt") or request.user_prompt
    request.temperature = overrides.get("temperature", request.temperature)
    return request


def handle_failure(job: Job, token: uuid.UUID, exc: ProviderError) -> None:
    # A final failure (permanent error, or retries exhausted) goes to a human, who retries
    # or rejects it; the error stays on the job either way.
    reason, evidence = review_rules.rule_for_failure(job, exc)
    review_services.do_escalate(
        job, token, reason=reason, evidence=evidence, error=exc.message,
        error_class=exc.error_class,
    )  # fmt: skip
    log.info("job=%s failed, escalated to review: %s", job.code, exc.message)
    kinds.after_run(job)


def handle_output(job: Job, token: uuid.UUID, completion: Completion) -> None:
    # Parse and validate per kind (one repair call for extract); then the review rules (low
    # confidence, sampling) decide between finishing and escalating: jobs.kinds.

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

    kinds.handle_output(job, token, completion, build_request(job), call=repair_call)


def call_provider(
    job: Job,
    request: CompletionRequest,
    on_delta: DeltaCallback | None = None,
    *,
    provider: Provider | None = None,
    read_timeout: float | None = None,
) -> Completion:
    """One provider call, recorded in the ledger whatever happens (settled in `finally`).
    `on_delta` receives each chunk of text of a streamed answer as it arrives. `provider` is
    the one jobs.retries chose (the fallback while the primary's breaker is open);
    `read_timeout` is clamped below what is left of the run's time."""
    workload = job.workload
    provider_row = provider or budgets.chosen_target(workload, job.overrides)[0]
    prompt_tokens = kinds.estimate_tokens(len(request.system_prompt) + len(request.user_prompt))
    # Before every call, first or retry: a run past its job's deadline expires the job, and a
    # cancelled or recovered one stops.
    if job.deadline is not None and job.deadline <= timezone.now():
        services.do_expire_run(job, job.run_token)
        raise retries.RunEnded("deadline passed while running")
    if job.cost_actual or documents.is_document_parent(job):
        # A paid call was made already and came out of the reservation, or this is a
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
    attempt = Attempt(
        job=job,
        number=job.attempt_count,
        provider=provider_row,
        model=request.model,
        started_at=timezone.now(),
    )
    started = time.monotonic()
    completion: Completion | None = None
    streamed: list[str] = []

    def delta(text: str) -> None:
        streamed.append(text)
        if on_delta is not None:
            on_delta(text)

    try:
        # The call waits seconds: give a pooled DB connection back meanwhile (jobs.dbconn).
        dbconn.release_while_waiting()
        completion = get_provider(provider_row, read_timeout=read_timeout).complete(
            request, delta if on_delta is not None else None
        )
        return completion
    except ProviderError as exc:
        attempt.http_status = exc.status
        attempt.error_class = exc.error_class
        attempt.error_message = exc.message[:2000]
        raise
    except BaseException as exc:
        attempt.error_class = type(exc).__name__
        attempt.error_message = str(exc)[:2000]
        raise
    finally:
        attempt.ended_at = timezone.now()
        attempt.latency_ms = int((time.monotonic() - started) * 1000)
        if completion is not None:
            attempt.http_status = completion.status
            attempt.tokens_in = completion.tokens_in
            attempt.tokens_out = completion.tokens_out
        elif streamed:
            # Cut mid-stream (cancelled, expired, timed out): the provider bills what it
            # generated. Estimated from the text received, as the usage report never came.
            attempt.tokens_in = prompt_tokens
            attempt.tokens_out = kinds.estimate_tokens(sum(len(text) for text in streamed))
        if attempt.tokens_in or attempt.tokens_out:
            price = provider_row.price_for(request.model)
            attempt.cost = price.cost(attempt.tokens_in, attempt.tokens_out) if price else 0
        attempt.save()
        if attempt.cost:
            Job.objects.filter(pk=job.pk).update(cost_actual=F("cost_actual") + attempt.cost)
            job.cost_actual = (job.cost_actual or Decimal(0)) + Decimal(attempt.cost)


@contextmanager
def heartbeat(
    job: Job,
    token: uuid.UUID,
    on_beat: Callable[[], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
):
    """Keep `heartbeat_at` fresh while the run is alive, so the reconciler can tell a slow
    job from one whose worker died. `on_beat` runs at each beat too (lease renewal);
    `on_lost(reason)` once the run must stop (jobs.heartbeats: cancelled, expired,
    recovered)."""
    beats = heartbeats.active()
    if beats is not None:
        # A threaded worker beats for all its runs in one query (jobs.heartbeats).
        beats.add(job.pk, token, on_beat, on_lost)
        try:
            yield
        finally:
            beats.remove(token)
        return
    stop = threading.Event()
    interval = settings.AIQUEUE_HEARTBEAT_INTERVAL

    def beat() -> None:
        try:
            while not stop.wait(interval):
                running = Job.objects.filter(pk=job.pk, run_token=token, status=Job.Status.RUNNING)
                if token not in heartbeats.check_runs(running):
                    if on_lost is not None:
                        on_lost(heartbeats.LOST)
                    return
                Job.objects.filter(pk=job.pk, run_token=token).update(heartbeat_at=timezone.now())
                if on_beat is not None:
                    on_beat()
        finally:
            # Django connections are per thread: this one would otherwise leak.
            db_connection.close()

    thread = threading.Thread(target=beat, name=f"heartbeat-{job.code}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 1)
