"""Pages for staff: submit a job, follow it, list jobs. Thin: parse, call a service, render."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import (
    DecimalField,
    ExpressionWrapper,
    F,
    OuterRef,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from jobs import services, timeline
from jobs.access import can_change_job, get_job_for_user, visible_jobs
from jobs.errors import form_status
from jobs.forms import JobFilterForm, SubmitJobForm
from jobs.live import listed_jobs
from jobs.models import Job


def job_list(request: HttpRequest) -> HttpResponse:
    form = JobFilterForm(request.GET or None)
    jobs = with_listed_cost(listed_jobs(visible_jobs(request.user)))  # one upload, one row
    jobs = form.ordering(form.apply(jobs))
    page = Paginator(jobs, settings.AIQUEUE_JOBS_PER_PAGE).get_page(request.GET.get("page"))
    # Only jobs this viewer may cancel get a bulk-action checkbox (the bulk view skips the
    # others anyway): a reviewer sees everyone's jobs but may change only their own.
    cancellable = {
        job.pk for job in page.object_list if job.can_cancel() and can_change_job(request.user, job)
    }
    query = request.GET.copy()
    query.pop("page", None)
    template = "jobs/list.html"
    # A history restore (Back to a page htmx did not keep: the list is hx-history="false")
    # wants the whole page, as a first load does.
    if request.htmx and not request.htmx.boosted and not request.htmx.history_restore_request:
        template += "#job-table"
    return render(
        request,
        template,
        {
            "form": form,
            "page": page,
            "query": query.urlencode(),
            "columns": sort_columns(request, form),
            "cancellable": cancellable,
        },
    )


# The job list's sortable columns: (label, sort key of jobs.forms.SORTS).
SORTABLE = [
    ("Workload", "workload"),
    ("Priority", "priority"),
    ("Status", "status"),
    ("Cost (USD)", "cost"),
    ("Attempts", "attempts"),
    ("Run time", "duration"),
    ("Submitted", "created"),
]


def sort_columns(request: HttpRequest, form: JobFilterForm) -> dict[str, dict[str, str]]:
    """Per sortable column: the link that sorts by it (descending first, then ascending; the
    other filters kept, back to page 1) and its aria-sort state."""
    current = (form.cleaned_data.get("sort") if form.is_bound else "") or "-created"
    query = request.GET.copy()
    query.pop("page", None)
    columns = {}
    for label, key in SORTABLE:
        query["sort"] = key if current == f"-{key}" else f"-{key}"
        state = {f"-{key}": "descending", key: "ascending"}.get(current, "none")
        columns[key] = {"label": label, "url": f"?{query.urlencode()}", "aria_sort": state}
    return columns


def with_listed_cost(jobs: QuerySet[Job]) -> QuerySet[Job]:
    """Annotate `listed_cost`: what each job cost, with its chunks for a document (what
    `Job.total_cost` says on its page), in the list's one query instead of one per row."""
    chunks = (
        Job.objects.filter(parent=OuterRef("pk"))
        .order_by()
        .values("parent")
        .annotate(total=Sum("cost_actual"))
        .values("total")
    )
    money = DecimalField(max_digits=14, decimal_places=8)
    chunks_cost = Coalesce(Subquery(chunks, output_field=money), Value(Decimal(0)))
    return jobs.annotate(
        listed_cost=ExpressionWrapper(F("cost_actual") + chunks_cost, output_field=money)
    )


def job_new(request: HttpRequest) -> HttpResponse:
    if request.method == "POST" and "estimate" in request.POST:
        # The estimate as typed (the form's live region, or its no-JS button): nothing is
        # submitted, nothing is validated.
        form = SubmitJobForm(request.POST)
        template = "jobs/new.html"
        if request.htmx and not request.htmx.boosted:
            template += "#job-estimate"
        return render(request, template, {"form": form, **form.cost_estimate()})
    if request.method == "POST":
        form = SubmitJobForm(request.POST, request.FILES)
        if form.is_valid():
            try:
                if form.cleaned_data.get("document") is not None:
                    job, created = services.do_submit_document(
                        workload=form.cleaned_data["workload"],
                        document=form.cleaned_data["document"],
                        user=request.user,
                        priority=form.cleaned_data["priority"],
                        idempotency_key=form.cleaned_data["idempotency_key"],
                        start_at=form.cleaned_data.get("start_at"),
                        deadline=form.cleaned_data.get("deadline"),
                    )
                else:
                    job, created = services.do_submit_job(
                        workload=form.cleaned_data["workload"],
                        input_text=form.cleaned_data["input_text"],
                        user=request.user,
                        priority=form.cleaned_data["priority"],
                        idempotency_key=form.cleaned_data["idempotency_key"],
                        start_at=form.cleaned_data.get("start_at"),
                        deadline=form.cleaned_data.get("deadline"),
                        input_data=form.cleaned_data.get("input_data"),
                    )
            except services.SubmitError as exc:
                # Backpressure and budget refusals say why and when to come back.
                form.add_error(None, str(exc))
            else:
                if created and job.status == Job.Status.HELD:
                    # Saved, but it will not run until its budget frees: say so, and why.
                    messages.warning(request, f"Job submitted but held: {job.wait_reason}.")
                elif created:
                    messages.success(request, "Job submitted. It runs in the background.")
                else:
                    messages.info(request, "This form was already submitted; here is that job.")
                return redirect(job)
    else:
        # `?workload=` (a dashboard link, the select's re-fetch): the form resolves it, paused
        # or not, and ignores an id that is not one.
        initial = {"idempotency_key": uuid.uuid4().hex, "workload": request.GET.get("workload")}
        form = SubmitJobForm(initial=initial)
    template = "jobs/new.html"
    if request.htmx and not request.htmx.boosted:
        template += "#workload-fields"  # the workload changed: only its fields are swapped
    return render(
        request, template, {"form": form, **form.cost_estimate()}, status=form_status(form)
    )


def job_detail(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = get_job_for_user(request, code)
    template = "jobs/detail.html"
    if request.htmx and not request.htmx.boosted:
        template += "#job-live"
    return render(request, template, job_context(request, job))


def job_context(request: HttpRequest, job: Job) -> dict:
    attempts = list(job.attempts.select_related("provider"))
    events = list(job.events.select_related("actor"))
    return {
        "job": job,
        "attempts": attempts,
        "events": events,
        "timeline": timeline.build(events, attempts),
        "can_change": can_change_job(request.user, job),
    }


@require_POST
def job_cancel_bulk(request: HttpRequest) -> HttpResponse:
    """Cancel the jobs ticked on the list (one POST), those the user may change."""
    codes = []
    for raw in request.POST.getlist("codes")[: settings.AIQUEUE_JOBS_PER_PAGE * 4]:
        try:
            codes.append(uuid.UUID(raw))
        except ValueError:
            continue
    cancelled = skipped = 0
    for job in visible_jobs(request.user).filter(code__in=codes):
        if can_change_job(request.user, job) and services.do_cancel_job(
            job, actor=request.user, reason="cancelled from the job list"
        ):
            cancelled += 1
        else:
            skipped += 1
    if cancelled:
        messages.success(request, f"{cancelled} job(s) cancelled.")
    if skipped:
        messages.warning(request, f"{skipped} job(s) had already finished or were not yours.")
    if not codes:
        messages.info(request, "Tick the jobs to cancel first.")
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/jobs/") else "jobs:list")


@require_POST
def job_cancel(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = get_job_for_user(request, code)
    if not can_change_job(request.user, job):
        raise PermissionDenied("You cannot cancel this job.")
    if services.do_cancel_job(job, actor=request.user, reason="cancelled from the job page"):
        messages.success(request, "Job cancelled.")
    else:
        messages.warning(request, f"The job is {job.get_status_display().lower()}; not cancelled.")
    return redirect(job)
