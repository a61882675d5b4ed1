"""The policy aiqueue replaces, for bench/outage.py to compare against: what a plain "retry 3
times with backoff" wrapper around each call does. No retry budget, no breaker, no parking,
Retry-After ignored. Workers use it with AIQUEUE_RETRY_POLICY=bench.naive_retries.call_with_retries
(runs.retries.call_with_retries hands over to a policy named there)."""

from __future__ import annotations

import time
import uuid

from django.conf import settings
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from jobs.models import Job, Provider
from jobs.providers.base import Completion, CompletionRequest, DeltaCallback
from runs.retries import Call, is_retryable

RETRIES = 3
POLICY = "bench.naive_retries.call_with_retries"


def call_with_retries(
    job: Job,
    token: uuid.UUID,
    request: CompletionRequest,
    *,
    primary: Provider,
    call: Call,
    on_delta: DeltaCallback | None = None,
) -> Completion:
    base = settings.AIQUEUE_RETRY_BACKOFF_BASE_MS / 1000
    retrying = Retrying(
        retry=retry_if_exception(is_retryable),
        stop=stop_after_attempt(RETRIES + 1),
        wait=wait_random_exponential(multiplier=base, max=settings.AIQUEUE_MAX_INLINE_RETRY_WAIT),
        sleep=time.sleep,
        reraise=True,
    )
    return retrying(
        lambda: call(
            job,
            request,
            on_delta=on_delta,
            provider=primary,
            read_timeout=primary.read_timeout_s,
        )
    )
