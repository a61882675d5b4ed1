"""Batch pages: upload, map and preview, follow live, pause/resume/cancel, download results."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from batches import export, services
from batches.forms import BatchUploadForm, MappingForm
from batches.models import Batch
from jobs.errors import REJECTED_FORM, form_status

PREVIEW_ROWS = 10


def is_asgi(request: HttpRequest) -> bool:
    return isinstance(request, ASGIRequest)


ERROR_ROWS = 50


def visible_batches(user) -> QuerySet[Batch]:
    batches = Batch.objects.select_related("workload", "created_by")
    if user.has_perm("jobs.view_job"):
        return batches
    return batches.filter(created_by=user)


def get_batch_for_user(request: HttpRequest, code: uuid.UUID) -> Batch:
    batch = visible_batches(request.user).filter(code=code).first()
    if batch is None:
        raise Http404("No such batch.")
    return batch


def get_batch_to_change(request: HttpRequest, code: uuid.UUID) -> Batch:
    batch = get_batch_for_user(request, code)
    if batch.created_by_id != request.user.pk and not request.user.has_perm("jobs.change_job"):
        raise PermissionDenied("You cannot change this batch.")
    return batch


def batch_list(request: HttpRequest) -> HttpResponse:
    batches = visible_batches(request.user)
    page = Paginator(batches, settings.AIQUEUE_JOBS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "batches/list.html", {"page": page})


def batch_new(request: HttpRequest) -> HttpResponse:
    form = BatchUploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            batch = services.do_create_batch(
                workload=form.cleaned_data["workload"],
                filename=upload.name,
                data=upload.read(),
                user=request.user,
                priority=form.cleaned_data["priority"],
            )
        except services.BatchError as exc:
            form.add_error(None, str(exc))
        else:
            messages.info(request, "File read. Check the columns and the preview, then start.")
            return redirect(batch)
    return render(request, "batches/new.html", {"form": form}, status=form_status(form))


def batch_detail(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = get_batch_for_user(request, code)
    template = "batches/detail.html"
    if request.htmx and not request.htmx.boosted:
        template += "#batch-live"
    return render(request, template, batch_context(request, batch))


def batch_context(request: HttpRequest, batch: Batch, form: MappingForm | None = None) -> dict:
    context = {
        "batch": batch,
        "progress": services.progress(batch),
        "can_change": batch.created_by_id == request.user.pk
        or request.user.has_perm("jobs.change_job"),
        "fields": batch.workload.input_fields,
    }
    if batch.status == Batch.Status.DRAFT:
        context.update(
            form=form or MappingForm(batch=batch),
            problems=services.mapping_problems(batch),
            preview=batch.rows.order_by("number")[:PREVIEW_ROWS],
            bad_rows=batch.rows.exclude(error="").order_by("number")[:ERROR_ROWS],
        )
    else:
        context["recent"] = (
            batch.rows.exclude(job=None).select_related("job").order_by("-job__updated_at")[:10]
        )
    return context


@require_POST
def batch_mapping(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = get_batch_to_change(request, code)
    form = MappingForm(request.POST, batch=batch)
    if form.is_valid():
        try:
            services.do_set_mapping(batch, form.mapping())
        except services.BatchError as exc:
            messages.error(request, str(exc))
        return redirect(batch)
    return render(
        request, "batches/detail.html", batch_context(request, batch, form), status=REJECTED_FORM
    )


@require_POST
def batch_start(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = get_batch_to_change(request, code)
    try:
        admitted = services.do_start_batch(batch)
    except services.BatchError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Batch started: the first {admitted} row(s) are queued.")
    return redirect(batch)


@require_POST
def batch_pause(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = get_batch_to_change(request, code)
    if services.do_pause_batch(batch):
        messages.success(request, "Batch paused: no new rows start; rows in flight finish.")
    return redirect(batch)


@require_POST
def batch_resume(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = get_batch_to_change(request, code)
    if services.do_resume_batch(batch):
        messages.success(request, "Batch resumed.")
    return redirect(batch)


@require_POST
def batch_cancel(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = get_batch_to_change(request, code)
    if batch.is_finished:
        messages.warning(request, f"The batch is {batch.get_status_display().lower()}.")
    else:
        # A draft has no job to cancel: its button says "Discard", and so does the message.
        was_draft = batch.status == Batch.Status.DRAFT
        cancelled = services.do_cancel_batch(batch, actor=request.user)
        if was_draft and not cancelled:
            messages.success(request, "Batch discarded.")
        else:
            messages.success(request, f"Batch cancelled ({cancelled} job(s) in flight cancelled).")
    return redirect(batch)


def batch_results(request: HttpRequest, code: uuid.UUID) -> StreamingHttpResponse:
    batch = get_batch_for_user(request, code)
    rows = export.astream_csv(batch) if is_asgi(request) else export.stream_csv(batch)
    response = StreamingHttpResponse(rows, content_type="text/csv; charset=utf-8")
    stem = batch.filename.rsplit(".", 1)[0] or "batch"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:80]
    response["Content-Disposition"] = f'attachment; filename="{safe}-results.csv"'
    return response
