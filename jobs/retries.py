"""The one retry layer: every provider call of a run goes through `call_with_retries`.

Retries live here and nowhere else (no transport retries in httpx, no RQ `Retry`, no SDK):
retries stacked in several layers multiply. One run of a job:

1. asks the provider's circuit breaker (jobs.flow.breaker) for a permit; while it is open the
   workload's fallback provider is used if its breaker is closed, else the job is parked until
   the probe time;
2. for a retry (a call after a failed call in the same run), asks the provider's retry budget
   (jobs.flow.retry_budget); a retry that does not fit is not made: the job is parked, and
   comes back later as new work (gated by the breaker, not the budget);
3. makes the call (`runner.call_provider`, which writes one Attempt row per call, the ledger);
4. on a retryable error (429, 408, 5xx, timeouts, connection errors, malformed answers) waits:
   the provider's Retry-After / rate-limit reset if it sent one, else exponential backoff with
   full jitter, uniform(0, base * 2^(n-1)). A wait longer than AIQUEUE_MAX_INLINE_RETRY_WAIT
   does not sleep in the worker: the job is parked (status waiting, reason and resume time on
   the job page) and RQ's scheduler brings it back;
5. stops after the workload's `max_attempts` calls, counted across the whole job (parking and
   resuming does not reset it; a reviewer sending the job back to the queue does).

A permanent error or exhausted attempts propagate as ProviderError for `runner.handle_failure`.
A parked or lost job raises RunEnded: the run is over and the runner returns quietly.

tenacity drives the loop; the decisions (breaker, budget, parking) are callbacks around it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from jobs import services
from jobs.flow import breaker, retry_budget
from jobs.models import Job, Provider
from jobs.providers.base import (
    Completion,
    CompletionRequest,
    DeltaCallback,
    ProviderConfigError,
    ProviderError,
)
from jobs.providers.registry import get_provider

log = logging.getLogger(__name__)

# A call needs at least this much of the run's time left; otherwise the job is parked and
# continues in a fresh run (RQ's own timeout must never be the one that fires).
MIN_CALL_TIME_S = 2.0
NAIVE_RETRIES = 3

Call = Callable[..., Completion]


class RunEnded(Exception):
    """The run is over without a result: the job was parked, or is no longer this run's."""


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


# Where a person decided to try a job again, so its attempts count afresh: sent back to the
# queue from review, or a chunk that had ended re-queued by its document's retry (jobs.documents).
TRIED_AGAIN_FROM = (
    Job.Status.NEEDS_REVIEW,
    Job.Status.FAILED,
    Job.Status.CANCELLED,
    Job.Status.EXPIRED,
)


def attempts_used(job: Job) -> int:
    """Calls made for the job since it was submitted, or last tried again (TRIED_AGAIN_FROM)."""
    if not job.attempt_count:
        return 0  # never called: nothing to count (the usual case, without a query)
    attempts = job.attempts.all()
    sent_back = (
        job.events.filter(from_status__in=TRIED_AGAIN_FROM, to_status=Job.Status.QUEUED)
        .order_by("-created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    if sent_back is not None:
        attempts = attempts.filter(started_at__gte=sent_back)
    return attempts.count()


def backoff(attempt: int) -> float:
    """Full jitter: uniform(0, min(cap, base * 2^(attempt-1))) seconds."""
    base = settings.AIQUEUE_RETRY_BACKOFF_BASE_MS / 1000
    return wait_random_exponential(multiplier=base, max=settings.AIQUEUE_RETRY_BACKOFF_MAX)(
        _state_for(attempt)
    )


def _state_for(attempt: int) -> RetryCallState:
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


def call_with_retries(
    job: Job,
    token: uuid.UUID,
    request: CompletionRequest,
    *,
    primary: Provider,
    call: Call,
    on_delta: DeltaCallback | None = None,
) -> Completion:
    """Run the job's provider calls until one succeeds; see the module docstring.

    `call(job, request, on_delta=..., provider=..., read_timeout=...)` makes one call and
    records its Attempt row.
    """
    if settings.AIQUEUE_RETRY_POLICY == "naive":
        return _naive(job, request, primary, call, on_delta)
    return _Run(job, token, request, primary, call, on_delta).execute()


class _Run:
    def __init__(
        self,
        job: Job,
        token: uuid.UUID,
        request: CompletionRequest,
        primary: Provider,
        call: Call,
        on_delta: DeltaCallback | None,
    ) -> None:
        self.job = job
        self.token = token
        self.request = request
        self.primary = primary
        self.call = call
        self.on_delta = on_delta
        self.max_attempts = job.workload.max_attempts
        self.used = attempts_used(job)
        # Failed calls in this run: the next call is a retry for the budget. A job coming
        # back from waiting is admitted like new work (the breaker still gates it): counting
        # it as a retry would let only the floor's few jobs a minute back in once traffic
        # stops, since the budget is a fraction of recent calls.
        self.failed_here = 0
        self.deadline = time.monotonic() + job.workload.timeout_s
        self.last_provider = primary

    def execute(self) -> Completion:
        if self.used >= self.max_attempts:
            raise ProviderError(
                f"gave up: all {self.max_attempts} attempts were used",
                retryable=True,
                error_class=self.job.error_class or "attempts_exhausted",
            )
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=lambda _state: self.used >= self.max_attempts,
            wait=self._wait,
            before_sleep=self._before_sleep,
            sleep=time.sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt)
        except ProviderError as exc:
            if exc.retryable:
                # Only reached when the attempts are used up.
                raise ProviderError(
                    f"gave up after {self.used} attempts: {exc.message}",
                    retryable=True,
                    status=exc.status,
                    retry_after=exc.retry_after,
                    error_class=exc.error_class,
                ) from exc
            raise

    # ---- one attempt

    def _attempt(self) -> Completion:
        # `call` (jobs.runner.call_provider) checks first that the run is still this one's:
        # a job cancelled between attempts raises RunEnded there, before any request is sent.
        provider, model, permit = self._choose_provider()
        try:
            # A missing key is a configuration error: no call, no attempt, no retry.
            get_provider(provider).api_key()
            remaining = self.deadline - time.monotonic()
            if self.job.deadline is not None:
                # The job's own deadline bounds the call too: a call that cannot finish
                # before it is not started, and the job expires.
                to_deadline = (self.job.deadline - timezone.now()).total_seconds()
                if to_deadline < MIN_CALL_TIME_S:
                    services.do_expire_run(self.job, self.token)
                    raise RunEnded("deadline passed while running")
                remaining = min(remaining, to_deadline)
            if remaining < MIN_CALL_TIME_S:
                self._park("the run's time is up", timezone.now() + timedelta(seconds=1))
            decision = retry_budget.acquire(provider, is_retry=self.failed_here > 0)
            if not decision.allowed:
                wait = settings.AIQUEUE_RETRY_BUDGET_WAIT * random.uniform(0.5, 1.5)
                self._park(
                    f"retry budget of {provider.name} exhausted "
                    f"({decision.retries} retries / {decision.calls} calls in the last "
                    f"{settings.AIQUEUE_RETRY_BUDGET_WINDOW} s)",
                    timezone.now() + timedelta(seconds=wait),
                )
        except BaseException:
            breaker.release(provider, was_probe=permit.is_probe)
            raise
        request = dataclasses.replace(self.request, model=model)
        self.used += 1
        self.last_provider = provider
        try:
            completion = self.call(
                self.job,
                request,
                on_delta=self.on_delta,
                provider=provider,
                read_timeout=min(provider.read_timeout_s, remaining),
            )
        except ProviderError as exc:
            self.failed_here += 1
            if isinstance(exc, ProviderConfigError):
                breaker.release(provider, was_probe=permit.is_probe)
            else:
                # Any answer but a retryable failure means the provider is up.
                breaker.record(
                    provider, ok=not exc.retryable, was_probe=permit.is_probe, reason=exc.message
                )
            raise
        except BaseException:
            breaker.release(provider, was_probe=permit.is_probe)
            raise
        state = breaker.record(provider, ok=True, was_probe=permit.is_probe)
        if permit.is_probe and state == breaker.CLOSED:
            wake_breaker_waiters(provider)
        return completion

    def _choose_provider(self) -> tuple[Provider, str, breaker.Permit]:
        permit = breaker.acquire(self.primary)
        if permit.allowed:
            return self.primary, self.request.model, permit
        workload = self.job.workload
        fallback = workload.fallback_provider
        if fallback is not None and fallback.is_active and fallback.pk != self.primary.pk:
            fallback_permit = breaker.acquire(fallback, allow_probe=False)
            if fallback_permit.allowed:
                log.info("job=%s using fallback %s: breaker open", self.job.code, fallback)
                return fallback, workload.fallback_model or self.request.model, fallback_permit
        now = timezone.now()
        # Open: come back at the probe time. Busy (a probe in flight): at the end of its lease;
        # if the probe succeeds, wake_breaker_waiters() brings the job back at once. Jitter
        # spreads the wake-ups so that parked jobs do not all arrive at the same instant.
        resume_at = max(permit.until or now, now) + timedelta(seconds=random.uniform(0.1, 2.0))
        self._park(breaker_wait_reason(self.primary), resume_at)
        raise AssertionError("unreachable")  # _park raises

    # ---- between attempts

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            return float(hint)
        return backoff(self.used)

    def _before_sleep(self, state: RetryCallState) -> None:
        seconds = state.upcoming_sleep
        exc = state.outcome.exception() if state.outcome else None
        status = getattr(exc, "status", None)
        what = "rate limited by provider" if status == 429 else f"provider error ({exc})"
        if seconds > settings.AIQUEUE_MAX_INLINE_RETRY_WAIT:
            self._park(what, timezone.now() + timedelta(seconds=seconds))
        if time.monotonic() + seconds + MIN_CALL_TIME_S > self.deadline:
            self._park(what, timezone.now() + timedelta(seconds=seconds))
        log.info("job=%s retrying in %.2f s: %s", self.job.code, seconds, what)

    # ---- ending the run without a result

    def _park(self, reason: str, resume_at: datetime) -> None:
        when = timezone.localtime(resume_at).strftime("%H:%M:%S")
        reason = f"{reason}; retrying at {when}"
        if services.do_park_job(self.job, reason=reason, resume_at=resume_at, token=self.token):
            log.info("job=%s parked: %s", self.job.code, reason)
        raise RunEnded(reason)


def breaker_wait_reason(provider: Provider) -> str:
    return f"circuit breaker open for {provider.name}"


def wake_breaker_waiters(provider: Provider, limit: int = 1000) -> int:
    """The probe closed the breaker: the jobs parked on it go back to their queues now
    instead of at their resume times. Returns how many were woken."""
    waiting = Job.objects.filter(
        status=Job.Status.WAITING, wait_reason__startswith=breaker_wait_reason(provider)
    ).select_related("workload")[:limit]
    woken = 0
    for job in waiting:
        if services.do_resume_job(job, reason=f"circuit breaker for {provider.name} closed"):
            woken += 1
    if woken:
        log.info("breaker for %s closed: woke %d waiting jobs", provider.name, woken)
    return woken


def _naive(
    job: Job,
    request: CompletionRequest,
    provider: Provider,
    call: Call,
    on_delta: DeltaCallback | None,
) -> Completion:
    """The policy aiqueue replaces, kept only for bench/outage.py: every call is retried up
    to 3 times with short jittered backoff; no budget, no breaker, no parking."""
    base = settings.AIQUEUE_RETRY_BACKOFF_BASE_MS / 1000
    retrying = Retrying(
        retry=retry_if_exception(is_retryable),
        stop=stop_after_attempt(NAIVE_RETRIES + 1),
        wait=wait_random_exponential(multiplier=base, max=settings.AIQUEUE_MAX_INLINE_RETRY_WAIT),
        sleep=time.sleep,
        reraise=True,
    )
    return retrying(
        lambda: call(
            job,
            request,
            on_delta=on_delta,
            provider=provider,
            read_timeout=provider.read_timeout_s,
        )
    )
