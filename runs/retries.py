"""The one retry layer: every provider call of a run goes through `call_with_retries`.

Retries live here and nowhere else (no transport retries in httpx, no RQ `Retry`, no SDK):
retries stacked in several layers multiply. One run of a job:

1. asks the provider's circuit breaker (jobs.flow.breaker) for a permit; while it is open the
   workload's fallback provider is used if its breaker is closed, else the job is parked until
   the probe time (and woken when the probes close it);
2. for a retry, asks the provider's retry budget (jobs.flow.retry_budget). A retry is any call
   of the job after its first since it was submitted or a person tried it again, counted from
   the ledger, so a call after a park, a resume or a worker restart is a retry too. One that
   does not fit is not made: the job is parked on the budget's wait list and woken when a
   retry succeeds somewhere (or the breaker closes). The breaker's half-open probes are
   retries the budget records but never refuses: the breaker bounds them;
3. makes the call (`runner.call_provider`, which writes one Attempt row per call, the ledger);
4. on a retryable error (429, 408, 5xx, 529, timeouts, connection errors, malformed answers)
   waits: the provider's Retry-After / rate-limit reset if it sent one, else exponential
   backoff with full jitter, uniform(0, base * 2^(n-1)). A wait longer than
   AIQUEUE_MAX_INLINE_RETRY_WAIT does not sleep in the worker: the job is parked (status
   waiting, reason and resume time on the job page) and RQ's scheduler brings it back;
5. bounds what a job may spend and how long it may wait. The workload's `max_attempts` counts
   *paid* calls (`Attempt.is_billed`: answers, and failures the provider may have billed, such
   as a timeout after it accepted the request), across the whole job. Failures that cost
   nothing (error answers: 5xx, 429, 529; a connection refused or reset before any answer)
   never use one up: the job waits and tries again, until its deadline passes (it expires,
   saying which provider was failing and how) or it has been failing for
   AIQUEUE_RETRY_MAX_WAIT seconds since its first failed call after its last answer (it goes
   to review, saying so). A provider outage alone ends a job only there.

A permanent error, exhausted paid attempts or the longest wait propagate as ProviderError for
`outcomes.fail`. A parked or lost job raises RunEnded: the run is over and the runner
returns quietly.

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
from django.utils.module_loading import import_string
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_random_exponential,
)

from jobs import credit, services
from jobs.flow import breaker, retry_budget
from jobs.models import Job, Provider
from jobs.providers import loop
from jobs.providers.base import (
    Completion,
    CompletionRequest,
    DeltaCallback,
    OutOfCredit,
    ProviderConfigError,
    ProviderError,
)
from jobs.providers.registry import get_provider
from jobs.services import (
    breaker_wait_reason,
    provider_recovered,
    provider_wait_on,
    wake_breaker_waiters,
    wake_budget_waiters,
)
from runs import shutdown

log = logging.getLogger(__name__)

# A call needs at least this much of the run's time left; otherwise the job is parked and
# continues in a fresh run (RQ's own timeout must never be the one that fires).
MIN_CALL_TIME_S = 2.0
# Jobs turned away by an open breaker: the first PROBERS come back at the probe time, the
# others are woken by the probes, with a fallback wake-up this long (±50 %) after it.
PROBERS = 2
BREAKER_RECHECK_S = 60

Call = Callable[..., Completion]


class RunEnded(Exception):
    """The run is over without a result: the job was parked, or is no longer this run's."""


class WaitedTooLong(ProviderError):
    """The provider kept failing for longer than a job may wait (AIQUEUE_RETRY_MAX_WAIT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True, error_class="provider_unavailable", billed=False)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable and not isinstance(exc, WaitedTooLong)


# Where a person decided to try a job again, so its attempts count afresh: sent back to the
# queue from review, a chunk that had ended re-queued by its document's retry (jobs.documents),
# or a replay (services.do_replay_job), which may also re-open a job that succeeded.
TRIED_AGAIN_FROM = (
    Job.Status.NEEDS_REVIEW,
    Job.Status.SUCCEEDED,
    Job.Status.FAILED,
    Job.Status.CANCELLED,
    Job.Status.EXPIRED,
)


@dataclasses.dataclass
class Ledger:
    """What the ledger says of a job's calls since it was submitted, or last tried again."""

    calls: int = 0
    billed: int = 0  # paid calls: what `max_attempts` bounds
    # The first failed call after the job's last answer; None when its last call answered.
    failing_since: datetime | None = None
    last_error: str = ""
    # The job's last call was cut short by the system (its worker died, stalled or stopped),
    # not answered or refused by the provider: the next call is a recovery.
    cut_short: bool = False


def ledger(job: Job) -> Ledger:
    """The job's calls since it was submitted or last tried again (TRIED_AGAIN_FROM)."""
    summary = Ledger()
    if not job.attempt_count:
        return summary  # never called: nothing to count (the usual case, without a query)
    attempts = job.attempts.all()
    sent_back = (
        job.events.filter(from_status__in=TRIED_AGAIN_FROM, to_status=Job.Status.QUEUED)
        .order_by("-created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    if sent_back is not None:
        attempts = attempts.filter(started_at__gte=sent_back)
    rows = attempts.order_by("number").values_list(
        "started_at", "is_billed", "consumes_attempt", "error_class", "error_message"
    )
    for started_at, is_billed, consumes_attempt, error_class, error_message in rows:
        summary.calls += 1
        # A call whose end the job did not cause (its worker died, stalled or stopped) is paid
        # but does not count against max_attempts (Attempt.consumes_attempt).
        summary.billed += is_billed and consumes_attempt
        summary.cut_short = not consumes_attempt
        if not error_class:
            summary.failing_since, summary.last_error = None, ""
        else:
            summary.failing_since = summary.failing_since or started_at
            summary.last_error = error_message
    return summary


def attempts_used(job: Job) -> int:
    """Paid calls made for the job since it was submitted, or last tried again."""
    return ledger(job).billed


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
    if settings.AIQUEUE_RETRY_POLICY != "standard":
        # Another policy, named by its dotted path, to compare against (bench/outage.py).
        policy = import_string(settings.AIQUEUE_RETRY_POLICY)
        return policy(job, token, request, primary=primary, call=call, on_delta=on_delta)
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
        past = ledger(job)
        # Every call from now on is a retry for the budget once the job has made one, in
        # this run or an earlier one.
        self.calls = past.calls
        self.used = past.billed
        self.failing_since = past.failing_since
        self.last_error = past.last_error
        # A recovery (the last call was cut short by a dead, stalled or stopped worker) is a
        # retry the budget records but does not refuse, like the breaker's probes: the crash
        # bounds how many there are, and parking them would let one killed worker with many
        # calls in flight hold its jobs for minutes. Refused only if it fails and retries again.
        self.recovering = past.cut_short
        self.deadline = time.monotonic() + job.workload.timeout_s
        self.last_provider = primary

    def execute(self) -> Completion:
        if self.used >= self.max_attempts:
            raise ProviderError(
                f"gave up: all {self.max_attempts} paid attempts were used",
                retryable=True,
                error_class=self.job.error_class or "attempts_exhausted",
            )
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=lambda _state: self.used >= self.max_attempts,
            wait=self._wait,
            before_sleep=self._before_sleep,
            sleep=loop.sleep,  # a run on the call loop parks instead of blocking it
            reraise=True,
        )
        try:
            return retrying(self._attempt)
        except ProviderError as exc:
            if is_retryable(exc):
                # Only reached when the paid attempts are used up.
                raise ProviderError(
                    f"gave up after {self.used} paid attempts: {exc.message}",
                    retryable=True,
                    status=exc.status,
                    retry_after=exc.retry_after,
                    error_class=exc.error_class,
                ) from exc
            raise

    # ---- one attempt

    def _attempt(self) -> Completion:
        # `call` (runs.runner.call_provider) checks first that the run is still this one's:
        # a job cancelled between attempts raises RunEnded there, before any request is sent.
        hand_back_if_stopping(self.job, self.token)
        provider, model, permit = self._choose_provider()
        try:
            # A missing key is a configuration error: no call, no attempt, no retry.
            get_provider(provider).api_key()
            remaining = self.deadline - time.monotonic()
            to_deadline = self.job.seconds_to_deadline()
            if to_deadline is not None:
                # The job's own deadline bounds the call too: a call that cannot finish
                # before it is not started, and the job expires.
                if to_deadline < MIN_CALL_TIME_S:
                    expiry = expiry_for(self.job)
                    services.do_expire_run(
                        self.job, self.token, reason=expiry.reason, error=expiry.error
                    )
                    raise RunEnded("deadline passed while running")
                remaining = min(remaining, to_deadline)
            if remaining < MIN_CALL_TIME_S:
                self._park(
                    "the run's time is up",
                    timezone.now() + timedelta(seconds=1),
                    kind=Job.WaitKind.OTHER,
                )
            is_retry = self.calls > 0
            budget = retry_budget.acquire(
                provider,
                is_retry=is_retry,
                force=permit.is_probe or self.recovering,
                waiter=self.job if is_retry else None,
            )
            if not budget.allowed:
                wait = settings.AIQUEUE_RETRY_BUDGET_WAIT * random.uniform(0.5, 1.5)
                try:
                    self._park(
                        f"retry budget of {provider.name} exhausted "
                        f"({budget.retries} retries / {budget.calls} calls in the last "
                        f"{settings.AIQUEUE_RETRY_BUDGET_WINDOW} s)",
                        timezone.now() + timedelta(seconds=wait),
                        kind=Job.WaitKind.RETRY_BUDGET,
                    )
                finally:
                    self._woken_while_parking(provider)
        except BaseException:
            breaker.release(provider, was_probe=permit.is_probe)
            raise
        request = dataclasses.replace(self.request, model=model)
        self.calls += 1
        self.recovering = False
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
            hand_back_if_stopping(self.job, self.token, release=(provider, permit))
            self.used += exc.billed
            if isinstance(exc, ProviderConfigError):
                breaker.release(provider, was_probe=permit.is_probe)
            elif not exc.retryable:
                # Any answer but a retryable failure means the provider is up.
                state = breaker.record(provider, ok=True, was_probe=permit.is_probe)
                self._answered(provider, permit, state, budget.member)
            else:
                breaker.record(
                    provider,
                    ok=False,
                    was_probe=permit.is_probe,
                    reason=exc.message,
                    retry_after=exc.retry_after,
                )
                self.failing_since = self.failing_since or timezone.now()
                self.last_error = exc.message
            if isinstance(exc, OutOfCredit):
                # Not retried, not failed: held until an operator adds credit (flow.credit).
                raise RunEnded(credit.hold_run(self.job, self.token, provider, exc)) from exc
            raise
        except BaseException:
            breaker.release(provider, was_probe=permit.is_probe)
            raise
        self.used += 1
        state = breaker.record(provider, ok=True, was_probe=permit.is_probe)
        self._answered(provider, permit, state, budget.member)
        return completion

    def _answered(
        self, provider: Provider, permit: breaker.Permit, state: str, retry_member: str
    ) -> None:
        """The provider answered: a retry gives its budget back (waking jobs waiting for
        room), and a probe either closed the breaker or lets the next probe go."""
        self.failing_since, self.last_error = None, ""
        if retry_member:
            wake_budget_waiters(provider, retry_budget.refund(provider, retry_member))
        if permit.is_probe and state == breaker.CLOSED:
            provider_recovered(provider)
        elif permit.is_probe and state == breaker.HALF_OPEN:
            # More probes must succeed before it closes: wake one waiter to be the next.
            wake_breaker_waiters(
                provider, limit=1, reason=f"circuit breaker for {provider.name}: next probe"
            )

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
        # Open: come back at the probe time. Busy (a probe in flight): at the end of its lease.
        # Only the first few jobs turned away do: they are the probes. The others would only
        # wake to be turned away again (every waiter at every probe time, in a long outage);
        # the probes wake them (the next probe, or all once it closes), and their own wake-up
        # is a fallback a while later. Jitter spreads the wake-ups.
        resume_at = max(permit.until or now, now) + timedelta(seconds=random.uniform(0.1, 2.0))
        if permit.turned_away > PROBERS:
            resume_at += timedelta(seconds=BREAKER_RECHECK_S * random.uniform(0.5, 1.5))
        self._park(
            breaker_wait_reason(self.primary),
            resume_at,
            kind=Job.WaitKind.BREAKER,
            wait_on=provider_wait_on(self.primary),
        )
        raise AssertionError("unreachable")  # _park raises

    # ---- between attempts

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            return float(hint)
        return backoff(self.calls)

    def _before_sleep(self, state: RetryCallState) -> None:
        seconds = state.upcoming_sleep
        exc = state.outcome.exception() if state.outcome else None
        status = getattr(exc, "status", None)
        what = "rate limited by provider" if status == 429 else f"provider error ({exc})"
        kind = Job.WaitKind.RATE_LIMIT if status == 429 else Job.WaitKind.BACKOFF
        self._check_wait()
        if seconds > settings.AIQUEUE_MAX_INLINE_RETRY_WAIT:
            self._park(what, timezone.now() + timedelta(seconds=seconds), kind=kind)
        if time.monotonic() + seconds + MIN_CALL_TIME_S > self.deadline:
            self._park(what, timezone.now() + timedelta(seconds=seconds), kind=kind)
        log.info("job=%s retrying in %.2f s: %s", self.job.code, seconds, what)

    def _check_wait(self) -> datetime | None:
        """Raise WaitedTooLong once the job has been failing for the longest wait; else the
        time at which it will have (None while its last call answered)."""
        if self.failing_since is None:
            return None
        limit = self.failing_since + timedelta(seconds=settings.AIQUEUE_RETRY_MAX_WAIT)
        if timezone.now() >= limit:
            waited = _duration((timezone.now() - self.failing_since).total_seconds())
            raise WaitedTooLong(
                f"gave up after waiting {waited} for {self.last_provider.name}: its calls "
                f"kept failing without a paid answer (last: {self.last_error})"[:500]
            )
        return limit

    def _woken_while_parking(self, provider: Provider) -> None:
        """The refusal put the job on the wait list; a refund that popped it before the park
        was written found it still running and let it be (`wake_budget_waiters`), and no
        other refund will come for it: it wakes itself, or it would wait for its fallback."""
        if not retry_budget.is_waiting(provider, self.job.code):
            services.do_resume_job(self.job, reason=f"retry budget of {provider.name} has room")

    # ---- ending the run without a result

    def _park(self, reason: str, resume_at: datetime, *, kind: str, wait_on: str = "") -> None:
        # Never sleep past the job's deadline or its longest wait: it wakes then, and
        # expires or gives up, saying why.
        limits = [self._check_wait(), self.job.deadline]
        resume_at = min([resume_at, *(limit for limit in limits if limit is not None)])
        when = timezone.localtime(resume_at).strftime("%H:%M:%S")
        reason = f"{reason}; retrying at {when}"
        parked = services.do_park_job(
            self.job,
            reason=reason,
            resume_at=resume_at,
            kind=kind,
            wait_on=wait_on,
            token=self.token,
        )
        if parked:
            log.info("job=%s parked: %s", self.job.code, reason)
        raise RunEnded(reason)


def hand_back_if_stopping(
    job: Job, token: uuid.UUID, *, release: tuple[Provider, breaker.Permit] | None = None
) -> None:
    """The worker is stopping (runs.shutdown): make no call, first or retry, and do not retry
    a call that failed meanwhile (against ports that are closing, it would only use up the
    job's attempts). The run goes back to the queue and another worker runs it."""
    if not shutdown.is_stopping():
        return
    if release is not None:
        breaker.release(release[0], was_probe=release[1].is_probe)
    services.do_recover_stale_run(job, reason=shutdown.HANDED_BACK, lost_calls="its worker stopped")
    raise RunEnded(shutdown.HANDED_BACK)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class Expiry:
    reason: str  # the audit event's
    error: str = ""  # shown on the job


def expiry_for(job: Job, default: str = "deadline passed while running") -> Expiry:
    """Why a job reached its deadline, from its ledger: when its last call failed, the
    provider's outage did it, and the job says so; otherwise `default`. A last call that timed
    out at the deadline was cut by the deadline (its read timeout is clamped to it), not failed
    by the provider."""
    last = None
    if job.attempt_count:
        last = (
            job.attempts.order_by("-number")
            .values_list("error_class", "error_message", "provider__name", "ended_at")
            .first()
        )
    if last is None or not last[0]:
        return Expiry(default)
    error_class, message, provider, ended_at = last
    if (
        error_class in ("timeout", "cut_off")
        and job.deadline is not None
        and ended_at is not None
        and ended_at >= job.deadline - timedelta(seconds=0.5)
    ):
        return Expiry(default)
    return Expiry(
        f"deadline passed while {provider} was failing"[:300],
        f"The deadline passed while waiting for {provider}, whose last call failed: {message}",
    )
