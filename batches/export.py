"""The results of a batch as CSV, streamed row by row (partial or complete, any time)."""

from __future__ import annotations

import csv
import re
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.db.models import Prefetch

from batches.models import Batch, BatchRow
from jobs import inputs
from review.models import ReviewItem

RESULT_COLUMNS = ["status", "output", "confidence", "cost_usd", "review_outcome", "error"]
# A spreadsheet runs a cell starting with these as a formula: model output and uploaded
# text (column names included) are untrusted, so such cells get a leading apostrophe (OWASP
# "CSV injection"). Only a plain decimal number keeps its sign: what float() also reads
# ("-inf", "+nan", " -1") a spreadsheet may take for a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _Echo:
    def write(self, value: str) -> str:
        return value


def _safe(value: object) -> str:
    """One cell as written: text stored before it was checked loses what cannot be encoded
    (the download broke off there), and a cell a spreadsheet would run is neutralised."""
    text = inputs.scrub("" if value is None else str(value))
    if text.startswith(FORMULA_STARTS) and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def header(batch: Batch) -> list[str]:
    names = ["row", *batch.columns]
    # Input columns that clash with the result columns get a prefix in the header only.
    return names + [f"result_{c}" if c in batch.columns else c for c in RESULT_COLUMNS]


def row_values(batch: Batch, row: BatchRow) -> list[str]:
    values = [str(row.number), *(row.data.get(column, "") for column in batch.columns)]
    job = row.job
    if row.error:
        return values + ["invalid", "", "", "", "", row.error]
    if job is None:
        status = "cancelled" if batch.status == Batch.Status.CANCELLED else "pending"
        return values + [status, "", "", "", "", ""]
    items = list(job.review_items.all())
    outcome = ""
    if items:
        last = items[-1]
        outcome = last.resolution or f"open ({last.get_reason_display().lower()})"
    confidence = "" if job.confidence is None else f"{job.confidence:.4f}"
    return values + [
        job.status,
        job.final_output,
        confidence,
        f"{job.cost_actual:.8f}",
        outcome,
        job.error,
    ]


PAGE_ROWS = 500


def _page(batch: Batch, after: int) -> tuple[str, int | None]:
    """CSV text of the next PAGE_ROWS rows after row number `after`, and the last number
    written (None when there are no more rows). Keyset pages: constant cost at any depth."""
    writer = csv.writer(_Echo())
    rows = list(
        BatchRow.objects.filter(batch=batch, number__gt=after)
        .select_related("job")
        .prefetch_related(
            Prefetch("job__review_items", queryset=ReviewItem.objects.order_by("created_at", "id"))
        )
        .order_by("number")[:PAGE_ROWS]
    )
    if not rows:
        return "", None
    text = "".join(writer.writerow([_safe(v) for v in row_values(batch, row)]) for row in rows)
    return text, rows[-1].number


def _head(batch: Batch) -> str:
    # The BOM makes spreadsheet programs read the file as UTF-8.
    return "\ufeff" + csv.writer(_Echo()).writerow([_safe(name) for name in header(batch)])


def stream_csv(batch: Batch) -> Iterator[str]:
    yield _head(batch)
    after: int | None = 0
    while after is not None:
        text, after = _page(batch, after)
        if text:
            yield text


async def astream_csv(batch: Batch) -> AsyncIterator[str]:
    """The same, for ASGI: Django would otherwise buffer a sync iterator whole before sending."""
    yield _head(batch)
    after: int | None = 0
    while after is not None:
        text, after = await sync_to_async(_page)(batch, after)
        if text:
            yield text
