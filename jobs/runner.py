"""Running one job: start the run, call the provider, record the attempt, finish the job.

The RQ task (jobs.tasks.run_job) is a thin wrapper around `execute()`. Everything a run
decides is written to the database; nothing here keeps state another process needs.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from decimal import Decimal

from django.conf import settings
from django.db import connection as db_connection
from django.db.models import F
from django.utils import timezone

from jobs import services
from jobs.models import Attempt, Job, Workload
from jobs.providers.base import Completion, CompletionRequest, ProviderError
from jobs.providers.registry import get_provider

log = logging.getLogger(__name__)


def execute(code: str, *, worker: str = "") -> str:
    """Run the job with this code if it is still queued. Returns the job's final status."""
    job = Job.objects.select_related("workload__provider").filter(code=code).first()
    if job is None:
        log.warning("job=%s not found; dropping its queue entry", code)
        return "missing"
    if job.status == Job.Status.WAITING and job.resume_at and job.resume_at <= timezone.now():
        # Its scheduled wake-up: back to queued, and this worker runs it now.
        services.do_resume_job(job, reason="resume time reached", enqueue=False)
    if job.status != Job.Status.QUEUED:
        # Cancelled, expired, still waiting, or already run elsewhere (a duplicate queue
        # entry): nothing to do.
        return job.status
    token = services.do_start_run(job, worker=worker)
    if token is None:
        return Job.objects.get(pk=job.pk).status
    with heartbeat(job, token):
        _run(job, token)
    return job.status


def _run(job: Job, token: uuid.UUID) -> None:
    request = build_request(job)
    try:
        completion = call_provider(job, request)
    except ProviderError as exc:
        handle_failure(job, token, exc)
        return
    handle_output(job, token, completion)


def build_request(job: Job) -> CompletionRequest:
    workload: Workload = job.workload
    return CompletionRequest(
        model=workload.model,
        system_prompt=workload.system_prompt,
        user_prompt=workload.render_prompt(job.input_text),
        max_output_tokens=workload.max_output_tokens,
        temperature=workload.temperature,
        labels=list(workload.labels or []),
    )


def handle_failure(job: Job, token: uuid.UUID, exc: ProviderError) -> None:
    services.do_fail_run(job, token, error=exc.message, error_class=exc.error_class)
    log.info("job=%s failed: %s", job.code, exc.message)


def handle_output(job: Job, token: uuid.UUID, completion: Completion) -> None:
    services.do_finish_run(
        job, token, output_text=completion.text, confidence=completion.confidence
    )
    log.info("job=%s succeeded", job.code)


def call_provider(job: Job, request: CompletionRequest) -> Completion:
    """One provider call, recorded in the ledger whatever happens (settled in `finally`)."""
    workload = job.workload
    provider_row = workload.provider
    number = Job.objects.filter(pk=job.pk).values_list("attempt_count", flat=True).get() + 1
    Job.objects.filter(pk=job.pk).update(attempt_count=number)
    job.attempt_count = number
    attempt = Attempt(
        job=job,
        number=number,
        provider=provider_row,
        model=request.model,
        started_at=timezone.now(),
    )
    started = time.monotonic()
    completion: Completion | None = None
    try:
        completion = get_provider(provider_row).complete(request)
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
            price = provider_row.price_for(request.model)
            attempt.cost = price.cost(completion.tokens_in, completion.tokens_out) if price else 0
        attempt.save()
        if attempt.cost:
            Job.objects.filter(pk=job.pk).update(cost_actual=F("cost_actual") + attempt.cost)
            job.cost_actual = (job.cost_actual or Decimal(0)) + Decimal(attempt.cost)


@contextmanager
def heartbeat(job: Job, token: uuid.UUID):
    """Keep `heartbeat_at` fresh while the run is alive, so the reconciler can tell a slow
    job from one whose worker died."""
    stop = threading.Event()
    interval = settings.AIQUEUE_HEARTBEAT_INTERVAL

    def beat() -> None:
        try:
            while not stop.wait(interval):
                Job.objects.filter(pk=job.pk, run_token=token).update(heartbeat_at=timezone.now())
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
