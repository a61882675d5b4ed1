"""Who may see and who may change a job: pages, the API and websockets ask here."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import Http404, HttpRequest

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
