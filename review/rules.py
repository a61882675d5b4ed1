"""When does a finished run go to a human instead of straight to its submitter?

`rule_for_output` decides for a successful provider call, `rule_for_failure` for a failed one.
Both return (reason, evidence) or None; runs.runner acts on the answer through
review.services.do_escalate.
"""

from __future__ import annotations

import hashlib
from typing import Any

from jobs.models import Job
from jobs.providers.base import Completion, ProviderError
from review.models import ReviewItem
from review.validation import InvalidOutput, validate_output

Escalation = tuple[str, dict[str, Any]]


def rule_for_output(job: Job, completion: Completion) -> Escalation | None:
    """Invalid output first (it can never be delivered), then low confidence, then sampling."""
    workload = job.workload
    try:
        validate_output(workload, completion.text)
    except InvalidOutput as exc:
        return ReviewItem.Reason.INVALID_OUTPUT, {"problem": str(exc)}
    threshold = workload.confidence_threshold
    confidence = completion.confidence
    if threshold is not None and confidence is not None and confidence < threshold:
        return ReviewItem.Reason.LOW_CONFIDENCE, {"confidence": confidence, "threshold": threshold}
    rate = workload.review_sample_rate or 0.0
    # A job a human already looked at (and sent back for a retry) is not sampled again.
    if rate > 0 and is_sampled(job, rate) and not job.review_items.exists():
        return ReviewItem.Reason.SAMPLED, {"sample_rate": rate}
    return None


def rule_for_failure(job: Job, exc: ProviderError) -> Escalation:
    """Every final failure goes to review: a human decides between retry and reject."""
    return ReviewItem.Reason.FAILED, {
        "error": exc.message[:500],
        "error_class": exc.error_class,
        "http_status": exc.status,
        "kind": "retries_exhausted" if exc.retryable else "permanent",
        "attempts": job.attempt_count,
        "max_attempts": job.workload.max_attempts,
    }


def is_sampled(job: Job, rate: float) -> bool:
    """Deterministic per job: the same job is always in or out of the sample, so tests and
    re-runs agree, while codes (random UUIDs) spread evenly over [0, 1)."""
    digest = hashlib.sha256(f"review-sample:{job.code}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate
