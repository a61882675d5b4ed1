"""How a run ends, in one place: the answer is judged (jobs.kinds) and the run finishes,
repairs once (extract), or escalates to the review inbox; a final provider error escalates
too. A job never fails straight from a run: a human retries or rejects it.

What follows a settled run (a document's next step, a batch's next wave) is not called from
here: `transition()` sends `jobs.signals.job_settled` on commit, and runs.mapreduce and
batches listen to it, as they do when a reviewer settles a job.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import Any

from jobs import kinds, services
from jobs.kinds import Verdict
from jobs.models import Job, Workload
from jobs.providers.base import Completion, CompletionRequest, ProviderError
from review import rules as review_rules
from review import services as review_services

log = logging.getLogger(__name__)


def judge(
    job: Job,
    token: uuid.UUID,
    completion: Completion,
    request: CompletionRequest,
    *,
    call: Callable[[Job, CompletionRequest], Completion],
) -> None:
    """Judge the answer; finish the job, repair once (extract), or escalate to review.

    `call` is the runner's ledgered provider call through the retry layer, so a repair is an
    Attempt like any other and a transient failure of it is retried.
    """
    workload = job.workload
    verdict = kinds.parse(workload, completion)
    evidence: dict[str, Any] = {}
    if (
        not verdict.ok
        and workload.kind == Workload.Kind.EXTRACT
        and verdict.reason == "invalid_output"
    ):
        evidence = {"first_answer": completion.text[:4000], "first_error": verdict.problem}
        repair = dataclasses.replace(
            request,
            user_prompt=request.user_prompt
            + kinds.REPAIR_PROMPT.format(answer=completion.text[:4000], error=verdict.problem),
        )
        services.do_set_progress(job, stage="repairing", message=verdict.problem, token=token)
        try:
            completion = call(job, repair)
        except ProviderError as exc:
            # Retried already (or the job's attempts are used up): a reviewer gets the first
            # answer and its problem, and can fix it by hand.
            evidence["repair_error"] = exc.message[:500]
            escalate(job, token, verdict, {**evidence, "problem": verdict.problem})
            return
        verdict = kinds.parse(workload, completion)
        evidence["repaired"] = verdict.ok
    if verdict.ok:
        finish(job, token, verdict)
    else:
        escalate(job, token, verdict, {**evidence, "problem": verdict.problem})


def finish(job: Job, token: uuid.UUID, verdict: Verdict) -> None:
    """A valid answer: the review rules (sampling for QA) may still send it to a human."""
    services.do_store_output(job, token, verdict.output_data)
    accepted = Completion(
        text=verdict.output_text, tokens_in=0, tokens_out=0, confidence=verdict.confidence
    )
    escalation = review_rules.rule_for_output(job, accepted)
    if escalation is not None:
        reason, evidence = escalation
        _escalate(job, token, verdict, reason, evidence)
        return
    services.do_finish_run(
        job, token, output_text=verdict.output_text, confidence=verdict.confidence
    )
    log.info("job=%s succeeded", job.code)


def escalate(job: Job, token: uuid.UUID, verdict: Verdict, evidence: dict[str, Any]) -> None:
    """Send the job to the review inbox with its output kept for the reviewer."""
    services.do_store_output(job, token, verdict.output_data)
    _escalate(job, token, verdict, verdict.reason, evidence)


def _escalate(
    job: Job, token: uuid.UUID, verdict: Verdict, reason: str, evidence: dict[str, Any]
) -> None:
    review_services.do_escalate(
        job,
        token,
        reason=reason,
        evidence=evidence,
        output_text=verdict.output_text,
        confidence=verdict.confidence,
    )
    log.info("job=%s escalated (%s): %s", job.code, reason, verdict.problem)


def fail(job: Job, token: uuid.UUID, exc: ProviderError) -> None:
    """A final failure (permanent error, or retries exhausted) goes to a human, who retries or
    rejects it; the error stays on the job either way."""
    reason, evidence = review_rules.rule_for_failure(job, exc)
    review_services.do_escalate(
        job, token, reason=reason, evidence=evidence, error=exc.message,
        error_class=exc.error_class,
    )  # fmt: skip
    log.info("job=%s failed, escalated to review: %s", job.code, exc.message)
