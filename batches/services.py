"""Batch state changes: create from an upload, map columns, start, admit waves, pause, resume,
cancel. Views and the runner call these; nothing else changes a Batch.

Admission in waves: a running batch keeps at most `max_in_flight` of its jobs in flight
(queued, running, waiting, held, scheduled). When a job of the batch settles and fewer than
half that many are in flight, the next wave of pending rows becomes jobs (through
`jobs.services.do_submit_job`, so budgets and admission control apply to each row as to any
job). The reconciler pass calls `admit_running()` as a safety net, which also marks batches
whose every row has settled as completed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.dispatch import receiver
from django.utils import timezone

from batches.models import Batch, BatchRow
from batches.parsing import parse_upload
from jobs import inputs, kinds, live, services, webhooks
from jobs.flow import budgets
from jobs.models import ApiToken, Job, Workload
from jobs.representations import moment, money
from jobs.signals import job_settled

log = logging.getLogger(__name__)

IN_FLIGHT = (
    Job.Status.QUEUED,
    Job.Status.RUNNING,
    Job.Status.WAITING,
    Job.Status.HELD,
    Job.Status.SCHEDULED,
)
WRITE_CHUNK = 1000


class BatchError(Exception):
    """The batch action was refused; the message is safe to show."""


# --------------------------------------------------------------------------- create and map


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def auto_mapping(fields: list[str], columns: list[str]) -> dict[str, str]:
    """Map each input field to the column of the same name (ignoring case and punctuation);
    a single field with a single column are mapped to each other."""
    by_norm = {_norm(column): column for column in columns}
    mapping = {f: by_norm[_norm(f)] for f in fields if _norm(f) in by_norm}
    if len(fields) == 1 and not mapping:
        common = ("input", "text", "content", "body", "message", "prompt")
        for name in (*common, *([columns[0]] if len(columns) == 1 else [])):
            if _norm(name) in by_norm:
                mapping[fields[0]] = by_norm[_norm(name)]
                break
    return mapping


def do_create_batch(
    *,
    workload: Workload,
    filename: str,
    data: bytes,
    user: AbstractBaseUser | None,
    priority: str = "",
    api_token: ApiToken | None = None,
) -> Batch:
    """Read the file and store every row as a pending BatchRow, in draft: nothing is queued
    until `do_start_batch`. A file without a single data row is refused (BatchError)."""
    if workload.kind == Workload.Kind.DOCUMENT:
        raise BatchError("Document workloads take uploaded files, not batch rows.")
    parsed = parse_upload(filename, data, max_rows=settings.AIQUEUE_BATCH_MAX_ROWS)
    if not parsed.rows:
        # A draft without rows (binary, header only, unreadable) has nothing to map or run.
        raise BatchError(parsed.errors[0] if parsed.errors else "The file has no data rows.")
    with transaction.atomic():
        batch = Batch.objects.create(
            workload=workload,
            created_by=user if user is not None and user.is_authenticated else None,
            api_token=api_token,
            filename=filename[:255],
            file_format=parsed.file_format,
            priority=priority or Batch._meta.get_field("priority").default,
            columns=parsed.columns,
            mapping=auto_mapping(workload.input_fields, parsed.columns),
            file_errors=parsed.errors,
            total_rows=len(parsed.rows),
        )
        rows = [
            BatchRow(batch=batch, number=row.number, data=row.data, parse_error=row.error)
            for row in parsed.rows
        ]
        BatchRow.objects.bulk_create(rows, batch_size=WRITE_CHUNK)
        validate_rows(batch)
    return batch


def unmapped_fields(batch: Batch) -> list[str]:
    """The workload's input fields with no column of the file mapped to them."""
    return [
        name
        for name in batch.workload.input_fields
        if not batch.mapping.get(name) or batch.mapping[name] not in batch.columns
    ]


def mapping_problems(batch: Batch) -> list[str]:
    problems = []
    for name in unmapped_fields(batch):
        column = batch.mapping.get(name)
        if not column:
            problems.append(f"Input field {name!r} has no column: choose one.")
        else:
            problems.append(f"Input field {name!r} is mapped to a missing column {column!r}.")
    return problems


def validate_rows(batch: Batch) -> None:
    """Apply the mapping to every row: its input fields, its error, and the batch's totals and
    estimated cost. Runs again whenever the mapping changes (draft only)."""
    workload = batch.workload
    fields = workload.input_fields
    mapping = batch.mapping
    # While a field has no column (mapping_problems) every row is invalid, and says why: the
    # preview and the results CSV show each invalid row's reason.
    unmapped = unmapped_fields(batch)
    mapping_error = ""
    if unmapped:
        mapping_error = "no column for input field " + ", ".join(map(repr, unmapped))
    prices: dict = {}
    priced = workload.provider.price_for(workload.model) is not None
    total = Decimal(0)
    invalid = 0
    changed: list[BatchRow] = []
    for row in batch.rows.order_by("number").iterator(chunk_size=WRITE_CHUNK):
        input_data, error = {}, row.parse_error or mapping_error
        text = ""
        if not error:
            values = {name: str(row.data.get(mapping[name], "") or "") for name in fields}
            try:
                text, input_data = kinds.named_input(workload, values)
            except kinds.FieldsError as refused:
                name = refused.missing[0]
                error = f"empty value for {name!r} (column {mapping[name]!r})"
            if not error and len(text) > services.MAX_INPUT_CHARS:
                error = f"input longer than {services.MAX_INPUT_CHARS:,} characters"
            if not error and (problem := inputs.text_problem(text)):
                error = f"the input {problem}"  # a row stored before the parser checked it
        if error:
            invalid += 1
            input_data = {}
        elif priced:
            # The reservation's own rule (jobs.flow.budgets, jobs.costs), so the preview and
            # what the rows will reserve agree.
            total += budgets.estimate_job(workload, input_data, prices=prices).usd
        if row.error != error or row.input_data != input_data:
            row.error, row.input_data = error, input_data
            changed.append(row)
        if len(changed) >= WRITE_CHUNK:
            BatchRow.objects.bulk_update(changed, ["error", "input_data"])
            changed = []
    if changed:
        BatchRow.objects.bulk_update(changed, ["error", "input_data"])
    batch.invalid_rows = invalid
    batch.estimated_cost = total
    batch.save(update_fields=["invalid_rows", "estimated_cost", "updated_at"])


def do_set_mapping(batch: Batch, mapping: dict[str, str]) -> None:
    if batch.status != Batch.Status.DRAFT:
        raise BatchError("The columns of a started batch cannot change.")
    batch.mapping = {k: v for k, v in mapping.items() if k in batch.workload.input_fields and v}
    batch.save(update_fields=["mapping", "updated_at"])
    validate_rows(batch)


# --------------------------------------------------------------------------- lifecycle


def _set_status(batch: Batch, from_statuses, to_status: str, **fields) -> bool:
    """Compare-and-set on the batch's status, like jobs.services.transition."""
    updated = Batch.objects.filter(pk=batch.pk, status__in=list(from_statuses)).update(
        status=to_status, updated_at=timezone.now(), **fields
    )
    if updated:
        batch.status = to_status
        for name, value in fields.items():
            setattr(batch, name, value)
        live.stale_on_commit(live.batch_group(batch.pk))
        if to_status in (Batch.Status.COMPLETED, Batch.Status.CANCELLED):
            transaction.on_commit(lambda: _tell_webhooks(batch, f"batch.{to_status}"))
    return bool(updated)


def _tell_webhooks(batch: Batch, event: str) -> None:
    base = settings.AIQUEUE_BASE_URL.rstrip("/")
    webhooks.batch_event(batch, event, lambda: batch_json(batch, base))


def do_start_batch(batch: Batch) -> int:
    """draft → running, and admit the first wave. Returns how many rows were admitted."""
    problems = mapping_problems(batch)
    if problems:
        raise BatchError(problems[0])
    if batch.valid_rows <= 0:
        raise BatchError("No row is valid: there is nothing to run.")
    if batch.workload.is_paused:
        raise BatchError(f"Workload {batch.workload.name!r} is paused; start the batch later.")
    if not _set_status(
        batch, [Batch.Status.DRAFT], Batch.Status.RUNNING, started_at=timezone.now()
    ):
        raise BatchError("This batch was already started.")
    return admit(batch.pk)


def do_pause_batch(batch: Batch) -> bool:
    """Stop admitting rows. Jobs already in flight (at most one wave) still finish."""
    return _set_status(batch, [Batch.Status.RUNNING], Batch.Status.PAUSED)


def do_resume_batch(batch: Batch) -> bool:
    won = _set_status(batch, [Batch.Status.PAUSED], Batch.Status.RUNNING, admission_error="")
    if won:
        admit(batch.pk)
    return won


def do_cancel_batch(batch: Batch, *, actor: AbstractBaseUser | None) -> int:
    """Stop the batch: pending rows are never run and jobs in flight are cancelled.
    Returns how many jobs were cancelled."""
    statuses = [Batch.Status.DRAFT, Batch.Status.RUNNING, Batch.Status.PAUSED]
    if not _set_status(batch, statuses, Batch.Status.CANCELLED, finished_at=timezone.now()):
        return 0
    cancelled = 0
    for job in Job.objects.filter(batch=batch, status__in=Job.CANCELLABLE_STATUSES).select_related(
        "workload"
    ):
        cancelled += services.do_cancel_job(job, actor=actor, reason="batch cancelled")
    return cancelled


def in_flight_count(batch_id: int) -> int:
    return Job.objects.filter(batch_id=batch_id, status__in=IN_FLIGHT).count()


def admit(batch_id: int) -> int:
    """Turn the next wave of pending rows into jobs, if the batch is running and has room.

    Serialised per batch by a row lock on the Batch (SQLite: the IMMEDIATE transaction), so
    two workers finishing jobs at once never admit the same rows or overfill the wave.
    """
    with transaction.atomic():
        batch = (
            Batch.objects.select_for_update(of=("self",))
            .select_related("workload__provider", "created_by")
            .filter(pk=batch_id)
            .first()
        )
        if batch is None or batch.status != Batch.Status.RUNNING:
            return 0
        in_flight = in_flight_count(batch.pk)
        room = batch.max_in_flight - in_flight
        pending = BatchRow.objects.filter(batch=batch, job__isnull=True, error="").order_by(
            "number"
        )
        rows = list(pending[: max(0, room)])
        admitted = 0
        for row in rows:
            text = kinds.render_input_text(row.input_data)
            if problem := inputs.text_problem(text):
                # Stored before the parser checked it: this row is invalid, not the wave.
                row.error = f"the input {problem}"
                row.save(update_fields=["error"])
                continue
            try:
                job, _ = services.do_submit_job(
                    workload=batch.workload,
                    input_text=text,
                    user=batch.created_by,
                    api_token=batch.api_token,
                    priority=batch.priority,
                    input_data=row.input_data,
                    batch=batch,
                    publish=False,
                )
            except services.SubmitError as exc:
                # Workload paused or budget refused: keep the rows pending and say why; the
                # next pass tries again.
                Batch.objects.filter(pk=batch.pk).update(admission_error=str(exc)[:300])
                live.stale_on_commit(live.batch_group(batch.pk))
                break
            row.job = job
            row.save(update_fields=["job"])
            admitted += 1
        if admitted:
            # Wave jobs are created without a publish each (services.do_submit_job's
            # `publish`): the batch's page hears of them once.
            live.stale_on_commit(live.batch_group(batch.pk))
        if admitted and batch.admission_error:
            Batch.objects.filter(pk=batch.pk).update(admission_error="")
        if not rows and in_flight == 0 and not _has_open_jobs(batch):
            _set_status(
                batch, [Batch.Status.RUNNING], Batch.Status.COMPLETED, finished_at=timezone.now()
            )
    if admitted:
        log.info("batch=%s admitted %d row(s)", batch.code, admitted)
    return admitted


def _has_open_jobs(batch: Batch) -> bool:
    """Rows still waiting for a reviewer keep the batch open until they are resolved."""
    return Job.objects.filter(batch=batch).exclude(status__in=Job.TERMINAL_STATUSES).exists()


@receiver(job_settled, dispatch_uid="batches-job-settled")
def _job_settled(sender, job: Job, **kwargs) -> None:
    if job.batch_id is not None:
        on_job_settled(job)


def on_job_settled(job: Job) -> None:
    """A job of a batch finished, failed or went to review: refill the wave when it is at
    most half full (checked without the lock first, so most settles cost one COUNT)."""
    batch = Batch.objects.filter(pk=job.batch_id).values("status", "max_in_flight").first()
    if batch is None or batch["status"] != Batch.Status.RUNNING:
        return
    if in_flight_count(job.batch_id) <= batch["max_in_flight"] // 2:
        admit(job.batch_id)


def admit_running() -> int:
    """The periodic pass (run by the reconciler): admit waves and complete finished batches."""
    total = 0
    for batch_id in Batch.objects.filter(status=Batch.Status.RUNNING).values_list("pk", flat=True):
        total += admit(batch_id)
    return total


# --------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """Where every valid row of a batch stands. The counts add up to the valid rows and use
    the statuses of the results CSV (batches.export): done is "succeeded", in review
    "needs_review", failed "failed" or "expired", cancelled "cancelled" (a job cancelled, or a
    row never queued because the batch was cancelled), remaining the rest."""

    total: int
    invalid: int
    pending: int
    in_flight: int
    done: int
    in_review: int
    failed: int
    cancelled: int
    spent: Decimal
    eta: timedelta | None

    @property
    def valid(self) -> int:
        return self.total - self.invalid

    @property
    def remaining(self) -> int:
        return self.pending + self.in_flight

    @property
    def settled(self) -> int:
        return self.done + self.in_review + self.failed + self.cancelled

    @property
    def percent(self) -> int:
        return int(100 * self.settled / self.valid) if self.valid > 0 else 0

    @property
    def waits_for_review(self) -> bool:
        """Nothing left to run, but rows in review keep the batch open (`_has_open_jobs`):
        its end depends on reviewers, not on an ETA."""
        return self.remaining == 0 and self.in_review > 0


def progress(batch: Batch) -> Progress:
    jobs = Job.objects.filter(batch=batch).aggregate(
        in_flight=Count("id", filter=Q(status__in=IN_FLIGHT)),
        done=Count("id", filter=Q(status=Job.Status.SUCCEEDED)),
        in_review=Count("id", filter=Q(status=Job.Status.NEEDS_REVIEW)),
        failed=Count("id", filter=Q(status__in=[Job.Status.FAILED, Job.Status.EXPIRED])),
        cancelled=Count("id", filter=Q(status=Job.Status.CANCELLED)),
        spent=Sum("cost_actual"),
    )
    unqueued = BatchRow.objects.filter(batch=batch, job__isnull=True, error="").count()
    # A cancelled batch never queues its remaining rows: they are cancelled, as the CSV says.
    never_run = unqueued if batch.status == Batch.Status.CANCELLED else 0
    result = Progress(
        total=batch.total_rows,
        invalid=batch.invalid_rows,
        pending=unqueued - never_run,
        in_flight=jobs["in_flight"],
        done=jobs["done"],
        in_review=jobs["in_review"],
        failed=jobs["failed"],
        cancelled=jobs["cancelled"] + never_run,
        spent=jobs["spent"] or Decimal(0),
        eta=None,
    )
    running = batch.status == Batch.Status.RUNNING and batch.started_at
    if running and result.settled and result.remaining:
        elapsed = (timezone.now() - batch.started_at).total_seconds()
        rate = result.settled / max(elapsed, 0.001)
        result.eta = timedelta(seconds=round(result.remaining / rate))
    return result


# A batch's JSON names at most this many of its rows' errors.
ROW_ERRORS_SHOWN = 20


def batch_json(batch: Batch, base: str) -> dict:
    """What the API (batches.api) and the webhooks say of a batch."""
    counts = progress(batch)
    row_errors = batch.rows.exclude(error="").order_by("number")[:ROW_ERRORS_SHOWN]
    return {
        "code": str(batch.code),
        "url": base + batch.get_absolute_url(),
        "api_url": f"{base}/api/batches/{batch.code}",
        "jobs_url": f"{base}/api/batches/{batch.code}/jobs",
        "workload": batch.workload.name,
        "status": batch.status,
        "priority": batch.priority,
        "total_rows": batch.total_rows,
        "invalid_rows": batch.invalid_rows,
        "row_errors": [{"row": row.number, "error": row.error} for row in row_errors],
        "file_errors": batch.file_errors,
        "admission_error": batch.admission_error or None,
        "progress": {
            "pending": counts.pending,
            "in_flight": counts.in_flight,
            "succeeded": counts.done,
            "in_review": counts.in_review,
            "failed": counts.failed,
            "cancelled": counts.cancelled,
            "percent": counts.percent,
        },
        "estimated_cost_usd": money(batch.estimated_cost),
        "spent_usd": money(counts.spent),
        "created_at": moment(batch.created_at),
        "started_at": moment(batch.started_at),
        "finished_at": moment(batch.finished_at),
    }
