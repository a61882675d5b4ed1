"""Documents: text out of an uploaded file, split into chunks, mapped and reduced.

Design (child jobs, chosen so that a failed chunk is retried alone with the machinery every
job already has):

1. **Upload.** The file's type is decided by its content (magic bytes: ``%PDF-``, a ZIP with
   ``word/document.xml``, else UTF-8 text without NUL bytes), never by its name alone; a name
   whose extension contradicts the content is refused. The size limit
   (AIQUEUE_DOCUMENT_MAX_BYTES) is checked before parsing. Text is extracted in the web
   request (pypdf, python-docx) so the submitter sees "encrypted PDF" or "no text in this
   PDF" at once, and so workers need no shared file storage (web and workers may run on
   different machines). The text is the document job's ``input_text``; the file's name, type
   and size are its ``input_data``.
2. **Map.** The document job's first run splits the text into chunks of about
   ``workload.chunk_chars`` characters (paragraph, then line, then sentence boundaries) and
   creates one child Job per chunk (``parent``, ``chunk_index``), enqueued on commit. The
   parent then parks (``waiting``) without holding a worker. Each chunk is an ordinary job:
   its own retries, budget reservation, review escalation and Attempt rows (the cost ledger).
3. **Progress.** Each settled chunk (its run ended, or a reviewer approved, corrected or
   rejected it) updates the parent's progress ("3 / 8 chunks") and, when it is the last one,
   wakes the parent (``do_resume_job``). The parent also wakes itself every CHECK_INTERVAL_S
   as a safety net, should that wake-up be lost.
4. **Reduce.** When every chunk has succeeded, the parent's run makes one call over the chunk
   results (``workload.reduce_prompt``) and finishes like a summarize job (jobs.kinds).
   A one-chunk document skips the reduce call: the chunk's answer is the result.
5. **Failure.** A chunk's provider errors are retried on the chunk alone (the provider retry
   layer), and a chunk that still fails goes to the review inbox by itself; the document waits
   while a chunk is in review. A chunk that ends failed or cancelled (rejected in review)
   sends the document to review naming the chunks; a reviewer's retry of the document then
   re-queues exactly those chunks and waits for them; chunks that succeeded are never re-run.
6. **Cost.** Every call is an Attempt on the job that made it; ``Job.total_cost`` sums the
   parent's own (reduce) cost and its chunks'. Cancelling the document cancels the chunks that
   have not finished (jobs.services.do_cancel_job), so they make no more calls.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Count, Max, Q
from django.db.models.functions import Greatest, Length
from django.utils import timezone

from jobs import queueing, services
from jobs.flow import budgets
from jobs.models import Job, JobEvent, Workload

log = logging.getLogger(__name__)

# The document's safety-net wake-up while it waits for its chunks, should a chunk's wake-up
# be lost (a process dying between the chunk's commit and the wake-up).
CHECK_INTERVAL_S = 120
TYPES = {"pdf": "PDF", "docx": "Word (.docx)", "txt": "plain text", "md": "Markdown"}
BAD_CHUNK_STATUSES = frozenset({Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.EXPIRED})


class DocumentError(ValueError):
    """The upload cannot be used; the message is safe to show to the submitter."""


@dataclass
class Document:
    filename: str
    file_type: str  # pdf, docx, txt, md
    size: int
    text: str

    @property
    def metadata(self) -> dict:
        return {
            "filename": self.filename,
            "file_type": self.file_type,
            "bytes": self.size,
            "chars": len(self.text),
        }


# --------------------------------------------------------------------------- extraction


def sniff_type(head: bytes, data: bytes | None = None) -> str | None:
    """The file's type from its content: pdf, docx, text, or None (unsupported)."""
    if head.lstrip(b"\xef\xbb\xbf\r\n\t ")[:5] == b"%PDF-":
        return "pdf"
    if head[:4] == b"PK\x03\x04":
        if data is not None:
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    if "word/document.xml" in archive.namelist():
                        return "docx"
            except zipfile.BadZipFile:
                return None
        return None
    if b"\x00" in head:
        return None
    return "text"


def extension_of(filename: str) -> str:
    return filename.rsplit(".", 1)[-1].lower() if "." in filename else ""


def read_upload(uploaded, *, max_bytes: int | None = None) -> Document:
    """Check and extract an uploaded file (a Django UploadedFile or any object with name,
    size and read()). Raises DocumentError with a message for the submitter."""
    max_bytes = max_bytes or settings.AIQUEUE_DOCUMENT_MAX_BYTES
    name = getattr(uploaded, "name", "") or "document"
    size = getattr(uploaded, "size", None)
    if size is not None and size > max_bytes:
        raise DocumentError(
            f"{name} is {size / 1_048_576:.1f} MB; the limit is {max_bytes / 1_048_576:.1f} MB."
        )
    data = uploaded.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DocumentError(f"{name} is larger than the {max_bytes / 1_048_576:.1f} MB limit.")
    return extract(name, data)


def extract(filename: str, data: bytes) -> Document:
    if not data:
        raise DocumentError(f"{filename} is empty.")
    kind = sniff_type(data[:1024], data)
    extension = extension_of(filename)
    if kind is None:
        raise DocumentError(
            f"{filename} is not a supported document: upload a PDF, a Word .docx, or a "
            "plain-text / Markdown file."
        )
    if kind == "text":
        kind = "md" if extension in ("md", "markdown") else "txt"
    claimed = {"markdown": "md", "text": "txt"}.get(extension, extension)
    if claimed in TYPES and claimed != kind and {claimed, kind} != {"txt", "md"}:
        raise DocumentError(
            f"{filename} is named like a {TYPES[claimed]} file but its content is "
            f"{TYPES[kind]}; the type is checked by content."
        )
    if kind == "pdf":
        text = _pdf_text(filename, data)
    elif kind == "docx":
        text = _docx_text(filename, data)
    else:
        text = _plain_text(filename, data)
    text = normalize(text)
    if not text.strip():
        hint = " (a scanned PDF has images, not text)" if kind == "pdf" else ""
        raise DocumentError(f"{filename} contains no text{hint}.")
    if len(text) > settings.AIQUEUE_DOCUMENT_MAX_CHARS:
        raise DocumentError(
            f"{filename} holds {len(text):,} characters of text; the limit is "
            f"{settings.AIQUEUE_DOCUMENT_MAX_CHARS:,}."
        )
    return Document(filename=filename, file_type=kind, size=len(data), text=text)


def _pdf_text(filename: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{filename} is an encrypted PDF; upload it without a password.")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError(f"{filename} is a damaged PDF: {exc}") from exc
    return "\n\n".join(page.strip() for page in pages)


def _docx_text(filename: str, data: bytes) -> str:
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - python-docx raises many kinds on bad files
        raise DocumentError(f"{filename} is a damaged Word file: {exc}") from exc
    parts = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text for cell in row.cells))
    return "\n\n".join(parts)


def _plain_text(filename: str, data: bytes) -> str:
    for encoding in ("utf-8-sig",):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DocumentError(
                f"{filename} is not UTF-8 text (byte {exc.start}); save it as UTF-8."
            ) from exc
    return ""  # pragma: no cover


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --------------------------------------------------------------------------- chunking


def split_into_chunks(text: str, size: int) -> list[str]:
    """Chunks of at most `size` characters, cut at the coarsest boundary that fits:
    paragraphs, then lines, then sentences, then words, then anywhere."""
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    chunks: list[str] = []
    for piece in _split(text, size, ("\n\n", "\n", ". ", " ")):
        if chunks and len(chunks[-1]) + 2 + len(piece) <= size:
            chunks[-1] = f"{chunks[-1]}\n\n{piece}" if "\n\n" in text else f"{chunks[-1]} {piece}"
        else:
            chunks.append(piece)
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def _split(text: str, size: int, separators: tuple[str, ...]) -> list[str]:
    if len(text) <= size:
        return [text]
    if not separators:
        return [text[i : i + size] for i in range(0, len(text), size)]
    separator, rest = separators[0], separators[1:]
    parts = [p for p in text.split(separator) if p.strip()]
    if len(parts) == 1:
        return _split(text, size, rest)
    pieces: list[str] = []
    current = ""
    for part in parts:
        part = part.strip() + ("." if separator == ". " and not part.endswith(".") else "")
        joined = f"{current}{' ' if separator != chr(10) * 2 else chr(10) * 2}{part}"
        if current and len(joined) <= size:
            current = joined
            continue
        if current:
            pieces.append(current)
        if len(part) > size:
            pieces.extend(_split(part, size, rest))
            current = ""
        else:
            current = part
    if current:
        pieces.append(current)
    return pieces


# --------------------------------------------------------------------------- submission


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
    return services.do_submit_job(
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


# --------------------------------------------------------------------------- the parent's run


def is_document_parent(job: Job) -> bool:
    return job.workload.kind == Workload.Kind.DOCUMENT and job.parent_id is None


def reduce_input_tokens(job: Job) -> int:
    """The most input the document's reduce call can have: the system prompt, the reduce
    prompt and every chunk's answer under its "Part N:" heading, each at the workload's max
    output tokens or, once written, its real length if longer (a reviewer's correction can
    be). Before the split, chunks are counted from the text as `_fan_out` will split it.
    Budgets reserve the reduce call with this, so a document held for budget is released
    only when its real call fits."""
    workload = job.workload
    lengths = list(
        job.children.annotate(
            chars=Greatest(Length("output_text"), Length("corrected_output"))
        ).values_list("chars", flat=True)
    )
    if not lengths:
        lengths = [0] * len(split_into_chunks(job.input_text, workload.chunk_chars))
    from jobs import kinds

    template = workload.reduce_prompt or kinds.DEFAULT_REDUCE_PROMPT
    heading = budgets.estimate_tokens(f"Part {len(lengths)}:\n\n\n")
    answers = sum(
        max(workload.max_output_tokens, kinds.estimate_tokens(chars)) for chars in lengths
    )
    return (
        budgets.estimate_tokens(workload.system_prompt)
        + budgets.estimate_tokens(template)
        + answers
        + len(lengths) * heading
        + 2 * budgets.MESSAGE_OVERHEAD_TOKENS
    )


def chunk_counts(job: Job) -> dict[str, int]:
    counts = job.children.aggregate(
        total=Count("id"),
        succeeded=Count("id", filter=Q(status=Job.Status.SUCCEEDED)),
        bad=Count("id", filter=Q(status__in=BAD_CHUNK_STATUSES)),
        review=Count("id", filter=Q(status=Job.Status.NEEDS_REVIEW)),
    )
    counts["open"] = counts["total"] - counts["succeeded"] - counts["bad"] - counts["review"]
    return counts


def ready_to_reduce(job: Job, token: uuid.UUID) -> bool:
    """Called at the start of a document job's run. Fans the chunks out on the first run;
    parks the job while chunks are open; sends it to review when a chunk failed. Returns
    True only when every chunk succeeded and the reduce call should be made now."""
    if not job.children.exists():
        _fan_out(job, token)
        return False
    counts = chunk_counts(job)
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
        from jobs import kinds

        only = job.children.get()
        kinds.finish(
            job, token, kinds.Verdict(output_text=only.final_output, confidence=only.confidence)
        )
        return False
    return True


def _fan_out(job: Job, token: uuid.UUID) -> None:
    chunks = split_into_chunks(job.input_text, job.workload.chunk_chars)
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
            token=token,
        )
        Job.objects.filter(pk=job.pk).update(progress_percent=0)
    log.info("job=%s document split into %d chunks", job.code, len(chunks))


def _park(job: Job, token: uuid.UUID, reason: str) -> None:
    services.do_park_job(
        job,
        reason=reason,
        resume_at=timezone.now() + timedelta(seconds=CHECK_INTERVAL_S),
        token=token,
    )
    # The last chunk may have settled while this run was deciding (it could not wake a
    # running document): look once more now that the document is waiting.
    counts = chunk_counts(job)
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
        job.children.filter(status__in=BAD_CHUNK_STATUSES, finished_at__lte=escalated_at)
        .select_related("workload")
        .order_by("chunk_index")
    )
    if not seen:
        return False
    with transaction.atomic():
        for chunk in seen:
            won = services.transition(
                chunk,
                BAD_CHUNK_STATUSES,
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
    from jobs import runner
    from jobs.providers.base import ProviderError

    bad = list(
        job.children.filter(status__in=BAD_CHUNK_STATUSES)
        .order_by("chunk_index")
        .values_list("chunk_index", flat=True)
    )
    numbers = ", ".join(str(i + 1) for i in bad[:20])
    runner.handle_failure(
        job,
        token,
        ProviderError(
            f"{len(bad)} of {counts['total']} chunks did not succeed (chunk {numbers}); "
            "retry the failed chunks to resume the document",
            retryable=False,
            error_class="chunk_failed",
        ),
    )


def on_chunk_settled(chunk: Job) -> None:
    """A chunk settled (its run ended, or review resolved it): update the document's
    progress; wake it when no chunk is open."""
    parent = Job.objects.select_related("workload").filter(pk=chunk.parent_id).first()
    if parent is None:
        return
    counts = chunk_counts(parent)
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


def combined_chunk_outputs(job: Job) -> str:
    parts = []
    for child in job.children.order_by("chunk_index"):
        parts.append(f"Part {child.chunk_index + 1}:\n{child.final_output.strip()}")
    return "\n\n".join(parts)
