"""Replay pages: one job from its page, or every job a filtered list shows (jobs.replay).

Each is a page first (GET: what will be replayed, how many, and the overrides to apply) and an
action second (POST, CSRF-checked): the question is asked by the server, so it is asked with
or without JS. Who may replay is who may cancel: the job's submitter and `jobs.change_job`.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from jobs import kinds, replay, services
from jobs.access import can_change_job, get_job_for_user, visible_jobs
from jobs.errors import REJECTED_FORM, form_status
from jobs.forms import JobFilterForm, OverridesForm
from jobs.models import Job, Workload

# One request replays at most this many jobs (each is a transaction): narrow the filters.
BULK_LIMIT = 500


def default_prompt(job: Job) -> str:
    return job.workload.render_prompt(kinds.prompt_values(job))


def job_replay(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = get_job_for_user(request, code)
    if not can_change_job(request.user, job):
        raise PermissionDenied("You cannot replay this job.")
    overrides = job.overrides or {}
    form = OverridesForm(
        request.POST if request.method == "POST" else None,
        initial={
            "provider": overrides.get("provider_id"),
            "model": overrides.get("model", ""),
            "temperature": overrides.get("temperature"),
            "prompt": overrides.get("prompt") or default_prompt(job),
        },
    )
    problem = replay.why_not_replayable(job)
    if request.method == "POST" and problem is None and form.is_valid():
        try:
            services.do_replay_job(
                job, actor=request.user, overrides=form.overrides(default_prompt(job))
            )
        except replay.ReplayError as exc:
            form.add_error(None, str(exc))
        else:
            if job.status == Job.Status.HELD:
                messages.warning(request, f"Job replayed but held: {job.wait_reason}.")
            else:
                messages.success(request, "Job replayed: it is back in the queue.")
            return redirect(job)
    status = REJECTED_FORM if request.method == "POST" else form_status(form)
    return render(
        request,
        "jobs/replay.html",
        {"job": job, "form": form, "problem": problem},
        status=status,
    )


def replayable_jobs(request: HttpRequest, filters: JobFilterForm) -> QuerySet[Job]:
    """The jobs the list shows with these filters that this user may replay now."""
    jobs = filters.apply(visible_jobs(request.user))
    if not request.user.has_perm("jobs.change_job"):
        jobs = jobs.filter(submitted_by=request.user)  # can_change_job, as a filter
    return jobs.filter(status__in=Job.REPLAYABLE_STATUSES).exclude(
        workload__kind=Workload.Kind.DOCUMENT
    )


def job_replay_bulk(request: HttpRequest) -> HttpResponse:
    """GET: how many jobs the list's filters select and a button to replay them; POST: replay
    them. The POST carries the filters, the count it was shown and the moment it was shown:
    only jobs submitted by then are replayed, and if more match now than were shown (jobs
    that ended meanwhile), nothing is replayed and the page shows the new count instead."""
    source = request.POST if request.method == "POST" else request.GET
    filters = JobFilterForm(source)
    as_of = _moment(source.get("as_of")) if request.method == "POST" else None
    as_of = as_of or timezone.now()
    jobs = replayable_jobs(request, filters).filter(created_at__lte=as_of)
    count = jobs.count()
    form = OverridesForm(request.POST if request.method == "POST" else None)
    error = ""
    if request.method == "POST" and form.is_valid():
        expected = source.get("expected", "")
        if count > BULK_LIMIT:
            error = f"{count} jobs match: at most {BULK_LIMIT} are replayed at once."
        elif str(count) != expected:
            error = f"{count} jobs match these filters now, not {expected or 0}: check again."
        elif count:
            # One override set for all: a changed prompt would be the same text for every
            # job, which is what the form says.
            replayed, skipped = services.do_replay_jobs(
                jobs.select_related("workload").order_by("created_at", "id"),
                actor=request.user,
                overrides=form.overrides(""),
            )
            if replayed:
                messages.success(request, f"{replayed} job(s) replayed.")
            if skipped:
                messages.warning(
                    request,
                    f"{len(skipped)} not replayed: "
                    + "; ".join(skipped[:5])
                    + (" …" if len(skipped) > 5 else ""),
                )
            return redirect(f"{reverse('jobs:list')}?{_filter_query(filters)}")
    return render(
        request,
        "jobs/replay_bulk.html",
        {
            "filters": filters,
            "query": _filter_query(filters),
            "count": count,
            "limit": BULK_LIMIT,
            "as_of": (as_of if request.method == "POST" else timezone.now()).isoformat(),
            "form": form,
            "error": error,
        },
        status=REJECTED_FORM if request.method == "POST" else 200,
    )


def _filter_query(filters: JobFilterForm) -> str:
    """The list's filters as its query string (the list page to go back to)."""
    query = filters.data.copy() if filters.is_bound else None
    if query is None:
        return ""
    for name in list(query):
        if name not in filters.fields:
            query.pop(name)
    return query.urlencode()


def _moment(raw: str | None) -> datetime | None:
    try:
        moment = parse_datetime(raw or "")
    except ValueError:
        return None
    if moment is None or timezone.is_naive(moment):
        return None
    return moment
