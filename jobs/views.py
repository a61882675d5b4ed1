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
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from jobs import dashboard as dashboard_data
from jobs import documents, services
from jobs.forms import JobFilterForm, SubmitJobForm
from jobs.live import listed_jobs
from jobs.models import Job


def visible_jobs(user) -> QuerySet[Job]:
    """Operators (view_job permission) see every job; everyone else sees their own."""
    jobs = Job.objects.select_related("workload", "submitted_by")
    if user.has_perm("jobs.view_job"):
        return jobs
    return jobs.filter(submitted_by=user)


def get_job_for_user(request: HttpRequest, code: uuid.UUID) -> Job:
    job = visible_jobs(request.user).filter(code=code).first()
    if job is None:
        raise Http404("No such job.")
    return job


def can_change_job(user, job: Job) -> bool:
    return job.submitted_by_id == user.pk or user.has_perm("jobs.change_job")


def dashboard(request: HttpRequest) -> HttpResponse:
    # A live region's re-fetch (static/js/live.js, the health panel's poll) renders only that
    # region; jobs.dashboard builds just what it needs.
    part = dashboard_data.requested_part(request)
    template = "jobs/dashboard.html" + (f"#{part}" if part else "")
    return render(request, template, dashboard_data.context(request, part))


def job_list(request: HttpRequest) -> HttpResponse:
    form = JobFilterForm(request.GET or None)
    jobs = with_listed_cost(listed_jobs(visible_jobs(request.user)))  # one upload, one row
    if form.is_bound:
        # A bad value (a hand-edited or stale link) drops only its own filter: cleaned_data
        # keeps the valid ones, and the table says which was ignored (form.errors).
        form.is_valid()
        if (search := form.search()) is not None:
            jobs = jobs.filter(search)
        if status := form.cleaned_data.get("status"):
            jobs = jobs.filter(status=status)
        if workload := form.cleaned_data.get("workload"):
            jobs = jobs.filter(workload=workload)
    page = Paginator(jobs, settings.AIQUEUE_JOBS_PER_PAGE).get_page(request.GET.get("page"))
    # Only jobs this viewer may cancel get a bulk-action checkbox (the bulk view skips the
    # others anyway): a reviewer sees everyone's jobs but may change only their own.
    cancellable = {
        job.pk for job in page.object_list if job.can_cancel() and can_change_job(request.user, job)
    }
    query = request.GET.copy()
    query.pop("page", None)
    template = "jobs/list.html"
    if request.htmx and not request.htmx.boosted:
        template += "#job-table"
    return render(
        request,
        template,
        {"form": form, "page": page, "query": query.urlencode(), "cancellable": cancellable},
    )


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
    if request.method == "POST":
        form = SubmitJobForm(request.POST, request.FILES)
        if form.is_valid():
            try:
                if form.cleaned_data.get("document") is not None:
                    job, created = documents.do_submit_document(
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
    return render(request, template, {"form": form})


def job_detail(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = get_job_for_user(request, code)
    template = "jobs/detail.html"
    if request.htmx and not request.htmx.boosted:
        template += "#job-live"
    return render(request, template, job_context(request, job))


def job_context(request: HttpRequest, job: Job) -> dict:
    return {
        "job": job,
        "attempts": job.attempts.select_related("provider"),
        "events": job.events.select_related("actor"),
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
