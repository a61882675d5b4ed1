"""Backpressure: refuse new work while too much is already waiting.

Limits: a workload's `max_queued` and the global `AIQUEUE_MAX_QUEUED` (0 = none). "Waiting"
counts every job that has not started: queued, waiting, held, scheduled. The check runs inside
the submit transaction, before the row is written, so a refused submission leaves nothing
behind. On PostgreSQL the workload row is locked for the check (`select_for_update`), so
concurrent submissions to one capped workload cannot all slip under its limit; the global
limit is a soft one there (two racing submissions may both pass). SQLite's IMMEDIATE
transactions serialise every submission anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from jobs.models import Job, Workload

NOT_STARTED = (Job.Status.QUEUED, Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED)


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after: int


def check(workload: Workload) -> Refusal | None:
    retry_after = settings.AIQUEUE_BACKPRESSURE_RETRY_AFTER
    if workload.max_queued:
        Workload.objects.select_for_update().filter(pk=workload.pk).first()
        waiting = Job.objects.filter(workload=workload, status__in=NOT_STARTED).count()
        if waiting >= workload.max_queued:
            return Refusal(
                f"The queue for {workload.name!r} is full ({waiting} jobs waiting, limit "
                f"{workload.max_queued}). Nothing was submitted; try again in about "
                f"{retry_after} seconds.",
                retry_after,
            )
    limit = settings.AIQUEUE_MAX_QUEUED
    if limit:
        waiting = Job.objects.filter(status__in=NOT_STARTED).count()
        if waiting >= limit:
            return Refusal(
                f"The system is at capacity ({waiting} jobs waiting, limit {limit}). Nothing "
                f"was submitted; try again in about {retry_after} seconds.",
                retry_after,
            )
    return None
