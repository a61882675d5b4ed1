"""Lists with actions, as Sidekiq's Scheduled / Retries / Dead tabs: the jobs that wait for a
time or a check with "Run now", the held ones with "Release", the failed ones with "Replay".

Operators only (`jobs.change_job`). Each action is a POST (CSRF) of the ticked jobs or of one
row's button, asked for confirmation in the page (static/js/confirm.js), done job by job through
its service, each audited as a JobEvent with the operator as actor.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse

from jobs import replay, services
from jobs.forms import JobFilterForm
from jobs.models import Job

PERMISSION = "jobs.change_job"


def _run_now(job: Job, user) -> str | None:
    if services.do_run_now(job, actor=user):
        return None
    return f"it is {job.get_status_display().lower()} now"


def _release(job: Job, user) -> str | None:
    if job.workload.provider.out_of_credit_since is not None:
        return "its provider is out of credit: clear that on the dashboard"
    released, full = services.do_try_release(
        job, reason="released from hold by an operator", actor=user
    )
    if released:
        return None
    if full is not None:
        return f"budget {full.name!r} still cannot take it"
    return f"it is {job.get_status_display().lower()} now"


def _replay(job: Job, user) -> str | None:
    try:
        services.do_replay_job(job, actor=user)
    except replay.ReplayError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class JobList:
    slug: str
    title: str
    statuses: tuple[str, ...]
    verb: str  # the action's button
    done: str  # "N job(s) <done>."
    act: Callable[[Job, object], str | None]  # None when done, else why not
    order: tuple[str, ...]
    blurb: str


LISTS = {
    "scheduled": JobList(
        "scheduled",
        "Scheduled and waiting",
        (Job.Status.SCHEDULED, Job.Status.WAITING),
        "Run now",
        "sent to run now",
        _run_now,
        ("resume_at", "created_at", "id"),
        "Jobs that wait for their start time, the off-peak window, capacity, a rate limit, the "
        "provider's breaker or a retry. Run now puts them back in the queue at once: admission "
        "still parks one whose cap is full, rate limit reached or breaker open.",
    ),
    "held": JobList(
        "held",
        "Held",
        (Job.Status.HELD,),
        "Release",
        "released",
        _release,
        ("created_at", "id"),
        "Jobs held by an exhausted budget (or a provider out of credit). Release reserves the "
        "job's worst case on its budgets again and queues it if that fits now.",
    ),
    "failed": JobList(
        "failed",
        "Failed",
        (Job.Status.FAILED,),
        "Replay",
        "replayed",
        _replay,
        ("-finished_at", "-id"),
        "Jobs that failed (rejected in review, or refused). Replay runs each again as a new run "
        "of its history, reserved on its budgets.",
    ),
}


def job_list(request: HttpRequest, slug: str) -> HttpResponse:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied("These lists are for operators.")
    spec = LISTS[slug]
    if request.method == "POST":
        return _act(request, spec)
    filters = JobFilterForm(request.GET or None)
    jobs = filters.apply(
        Job.objects.select_related("workload", "submitted_by").filter(status__in=spec.statuses)
    ).order_by(*spec.order)
    page = Paginator(jobs, settings.AIQUEUE_JOBS_PER_PAGE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "jobs/lists.html",
        {
            "spec": spec,
            "lists": LISTS.values(),
            "form": filters,
            "page": page,
            "query": query.urlencode(),
        },
    )


def _act(request: HttpRequest, spec: JobList) -> HttpResponse:
    raw = [request.POST["one"]] if request.POST.get("one") else request.POST.getlist("codes")
    codes = []
    for value in raw[: settings.AIQUEUE_JOBS_PER_PAGE * 4]:
        try:
            codes.append(uuid.UUID(value))
        except ValueError:
            continue
    done, skipped = 0, []
    jobs = Job.objects.select_related("workload__provider").filter(code__in=codes)
    for job in jobs.order_by("created_at", "id"):
        if job.status not in spec.statuses:
            skipped.append(f"{str(job.code)[:8]}: it is {job.get_status_display().lower()} now")
        elif (why := spec.act(job, request.user)) is None:
            done += 1
        else:
            skipped.append(f"{str(job.code)[:8]}: {why}")
    if not codes:
        messages.info(request, "Tick the jobs first.")
    if done:
        messages.success(request, f"{done} job(s) {spec.done}.")
    if skipped:
        more = " …" if len(skipped) > 5 else ""
        messages.warning(request, f"{len(skipped)} skipped: " + "; ".join(skipped[:5]) + more)
    back = request.POST.get("next", "")
    own = reverse(f"jobs:list-{spec.slug}")
    return redirect(back if back.startswith(own) else own)


urlpatterns = [
    path(f"lists/{slug}/", job_list, {"slug": slug}, name=f"list-{slug}") for slug in LISTS
]
