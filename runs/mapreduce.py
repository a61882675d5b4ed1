"""A document's run: map (one child job per chunk), wait, reduce (jobs/documents.py has the
design, the extraction and the splitting).

The document job's first run fans the chunks out and parks; each settled chunk
(`jobs.signals.job_settled`: its run ended, or a reviewer settled it) updates the document's
progress and wakes it when no chunk is open; its next run reduces, or sends it to review
naming the chunks that failed. A chunk that fails review sends its document to review here.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from django.db import transaction
from django.db.models import Max
from django.dispatch import receiver
from django.utils import timezone

from jobs import documents, queueing, services
from jobs.kinds import Verdict
from jobs.models import Job, JobEvent
from jobs.providers.base import ProviderError
from jobs.signals import job_settled
from runs import outcomes

log = logging.getLogger(__name__)

# The document's safety-net wake-up while it waits for its chunks, should a chunk's wake-up
# be lost (a process dying between the chunk's commit and the wake-up).
CHECK_INTERVAL_S = 120


def ready_to_reduce(job: Job, token: uuid.UUID) -> bool:
    """Called at the start of a document job's run. Fans the chunks out on the first run;
    parks the job while chunks are open; sends it to review when a chunk failed. Returns
    True only when every chunk succeeded and the reduce call should be made now."""
    if not job.children.exists():
        _fan_out(job, token)
        return False
    counts = documents.chunk_counts(job)
    if counts["bad"] and _retry_seen_bad_chunks(job, token):
        return False
    if counts["bad"]:
        _fail_on_bad_chunks(job, token, counts)
        return False
    if counts["open"] or counts["review"]:
        waiting_for = counts["open"] + counts["review"]
        _park(job, token, f"{waiting_for} of {counts['total']} chunks still to finish")
        return False
    services.do_set_progress(
        job,
        stage="reducing",
        message=f"combining {counts['total']} chunks",
        percent=95,
        token=token,
    )
    if counts["total"] == 1:
        # One chunk: its answer is the document's; a reduce call would only rephrase it.
        only = job.children.get()
        outcomes.finish(
            job, token, Verdict(output_text=only.final_output, confidence=only.confidence)
        )
        return False
    return True


def _fan_out(job: Job, token: uuid.UUID) -> None:
    chunks = documents.split_into_chunks(job.input_text, job.workload.chunk_chars)
    # One transaction: the chunks are enqueued (on commit) only once the document is parked,
    # so even the fastest chunk finds it waiting and can wake it.
    with transaction.atomic():
        for index, chunk in enumerate(chunks):
            services.do_submit_job(
                workload=job.workload,
                input_text=chunk,
                user=job.submitted_by,
                priority=job.priority,
                parent=job,
                chunk_index=index,
                max_input_chars=max(services.MAX_INPUT_CHARS, len(chunk)),
            )
        JobEvent.objects.create(
            job=job,
            from_status=job.status,
            to_status=job.status,
            reason=f"split into {len(chunks)} chunks",
            data={"chunks": len(chunks)},
        )
        services.do_park_job(
            job,
            reason=f"{len(chunks)} of {len(chunks)} chunks still to finish",
            resume_at=timezone.now() + timedelta(seconds=CHECK_INTERVAL_S),
            kind=Job.WaitKind.CHUNKS,
            token=token,
        )
        Job.objects.filter(pk=job.pk).update(progress_percent=0)
    log.info("job=%s document split into %d chunks", job.code, len(chunks))


def _park(job: Job, token: uuid.UUID, reason: str) -> None:
    services.do_park_job(
        job,
        reason=reason,
        resume_at=timezone.now() + timedelta(seconds=CHECK_INTERVAL_S),
        kind=Job.WaitKind.CHUNKS,
        token=token,
    )
    # The last chunk may have settled while this run was deciding (it could not wake a
    # running document): look once more now that the document is waiting.
    counts = documents.chunk_counts(job)
    if counts["open"] == 0 and (counts["review"] == 0 or counts["bad"]):
        services.do_resume_job(job, reason="chunks settled")


def _retry_seen_bad_chunks(job: Job, token: uuid.UUID) -> bool:
    """A document run again after it was escalated for failed chunks (a reviewer's retry)
    re-queues exactly those chunks, never the ones that succeeded, and waits for them."""
    escalated_at = job.events.filter(to_status=Job.Status.NEEDS_REVIEW).aggregate(
        at=Max("created_at")
    )["at"]
    if escalated_at is None:
        return False
    seen = list(
        job.children.filter(status__in=documents.BAD_CHUNK_STATUSES, finished_at__lte=escalated_at)
        .select_related("workload")
        .order_by("chunk_index")
    )
    if not seen:
        return False
    with transaction.atomic():
        for chunk in seen:
            won = services.transition(
                chunk,
                documents.BAD_CHUNK_STATUSES,
                Job.Status.QUEUED,
                reason="chunk retried with its document",
                stage="queued",
                error="",
                error_class="",
                queued_at=timezone.now(),
                finished_at=None,
                progress_percent=0,
                progress_message="",
            )
            if won:
                transaction.on_commit(lambda c=chunk: queueing.enqueue(c))
    _park(job, token, f"{len(seen)} retried chunk(s) still to finish")
    return True


def _fail_on_bad_chunks(job: Job, token: uuid.UUID, counts: dict[str, int]) -> None:

    bad = list(
        job.children.filter(status__in=documents.BAD_CHUNK_STATUSES)
        .order_by("chunk_index")
        .values_list("chunk_index", flat=True)
    )
    numbers = ", ".join(str(i + 1) for i in bad[:20])
    outcomes.fail(
        job,
        token,
        ProviderError(
            f"{len(bad)} of {counts['total']} chunks did not succeed (chunk {numbers}); "
            "retry the failed chunks to resume the document",
            retryable=False,
            error_class="chunk_failed",
        ),
    )


@receiver(job_settled, dispatch_uid="mapreduce-chunk-settled")
def _chunk_settled(sender, job: Job, **kwargs) -> None:
    if job.parent_id is not None:
        on_chunk_settled(job)


def on_chunk_settled(chunk: Job) -> None:
    """A chunk settled (its run ended, or review resolved it): update the document's
    progress; wake it when no chunk is open."""
    parent = Job.objects.select_related("workload").filter(pk=chunk.parent_id).first()
    if parent is None:
        return
    counts = documents.chunk_counts(parent)
    done = counts["succeeded"]
    Job.objects.filter(pk=parent.pk, status=Job.Status.WAITING).update(
        progress_percent=int(90 * done / max(1, counts["total"])),
        progress_message=f"{done} / {counts['total']} chunks done"
        + (f", {counts['bad']} failed" if counts["bad"] else "")
        + (f", {counts['review']} in review" if counts["review"] else ""),
        updated_at=timezone.now(),
    )
    services.publish_on_commit(parent)
    if counts["open"] == 0 and (counts["review"] == 0 or counts["bad"]):
        services.do_resume_job(parent, reason="chunks settled")
