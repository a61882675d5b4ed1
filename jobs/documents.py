"""Documents: text out of an uploaded file, split into chunks (mapped and reduced by
runs.mapreduce; submitted by services.do_submit_document).

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
import zipfile
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Q

from jobs import costs, inputs, kinds
from jobs.models import Job, Workload

log = logging.getLogger(__name__)

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
    if problem := inputs.text_problem(text):  # a PDF's text can hold anything
        raise DocumentError(f"{filename} cannot be read as text: its text {problem}.")
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


# --------------------------------------------------------------------------- a document's chunks


def is_document_parent(job: Job) -> bool:
    return job.workload.kind == Workload.Kind.DOCUMENT and job.parent_id is None


def reduce_input_tokens(job: Job) -> int:
    """The most input the document's reduce call can have: the system prompt, the reduce
    prompt and every chunk's answer under its "Part N:" heading, each at the workload's max
    output tokens or, once written, its own bound if larger (a reviewer's correction can be;
    jobs.costs has the rule). Before the split, chunks are counted from the text as `_fan_out`
    will split it. Budgets reserve the reduce call with this, so a document held for budget
    is released only when its real call fits."""
    workload = job.workload
    answers = [
        corrected or output
        for output, corrected in job.children.values_list("output_text", "corrected_output")
    ]
    if not answers:
        answers = [""] * len(split_into_chunks(job.input_text, workload.chunk_chars))
    template = workload.reduce_prompt or kinds.DEFAULT_REDUCE_PROMPT
    heading = costs.text_tokens(f"Part {len(answers)}:\n\n\n")
    parts = sum(
        max(workload.max_output_tokens, costs.text_tokens(text)) + heading for text in answers
    )
    return costs.input_tokens(kinds.system_prompt_for(workload), template) + parts


def chunk_counts(job: Job) -> dict[str, int]:
    counts = job.children.aggregate(
        total=Count("id"),
        succeeded=Count("id", filter=Q(status=Job.Status.SUCCEEDED)),
        bad=Count("id", filter=Q(status__in=BAD_CHUNK_STATUSES)),
        review=Count("id", filter=Q(status=Job.Status.NEEDS_REVIEW)),
    )
    counts["open"] = counts["total"] - counts["succeeded"] - counts["bad"] - counts["review"]
    return counts
