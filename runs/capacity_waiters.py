"""Jobs parked on a concurrency cap are woken as soon as they may fit, not one by one.

A release pops one waiter per freed slot (runs.admission.finish). Two things free room without
a release, and used to leave the waiters to their fallback wake-up:

- an operator raises or removes a cap (a Provider's `max_concurrency`, a Workload's
  `concurrency_cap`): every waiter that now fits is woken at once, all of them when the cap
  is gone (they trickled out one per completion);
- Redis loses the wait lists (a wipe, a failover to an empty replica): a capacity waiter that
  is on no wait list is woken by the reconciler's next pass, whose admission puts it back on
  the list if the cap is still full (13 of 15 waited for the 120 s fallback).
"""

from __future__ import annotations

import logging

import redis
from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver

from jobs import queueing, services
from jobs.flow import leases
from jobs.models import Job, Provider, Workload
from runs import admission

log = logging.getLogger(__name__)


def wake_room(resource: leases.Resource) -> int:
    """Wake as many of the resource's waiters as it has free slots (all of them for a
    resource without a cap: limit 0). Returns how many were woken."""
    try:
        waiting = len(leases.waiters(resource))
        room = waiting if not resource.limit else resource.limit - leases.in_use(resource)
    except redis.RedisError as exc:
        log.warning("could not read %s's wait list: %s", resource.label, exc)
        return 0
    woken = 0
    for _ in range(max(0, min(room, waiting))):
        code = leases.pop_waiter(resource)
        if not code:
            break
        admission._wake_one(resource, code)
        woken += 1
    return woken


def _wake_on_commit(resource: leases.Resource) -> None:
    # On commit: the woken jobs' admission must read the new cap.
    transaction.on_commit(lambda: wake_room(resource), robust=True)


@receiver(post_save, sender=Workload)
def _workload_saved(sender, instance: Workload, created: bool, **kwargs) -> None:
    if not created:
        _wake_on_commit(
            leases.Resource(
                f"workload:{instance.pk}",
                f"workload {instance.name}",
                instance.concurrency_cap or 0,
            )
        )


@receiver(post_save, sender=Provider)
def _provider_saved(sender, instance: Provider, created: bool, **kwargs) -> None:
    if not created:
        _wake_on_commit(
            leases.Resource(f"provider:{instance.pk}", instance.name, instance.max_concurrency or 0)
        )


def wake_unlisted(limit: int = 500) -> int:
    """Wake the capacity waiters that are on none of their resources' wait lists (Redis lost
    them). Returns how many were woken."""
    parked = list(
        Job.objects.filter(
            status=Job.Status.WAITING, wait_kind=Job.WaitKind.CAPACITY
        ).select_related("workload__provider")[:limit]
    )
    if not parked:
        return 0
    try:
        with queueing.connection().pipeline(transaction=False) as pipe:
            listed_on = []
            for job in parked:
                keys = [
                    leases.WAIT_KEY.format(resource=resource.name)
                    for resource in leases.resources_for(job.workload)
                ]
                listed_on.append(len(keys))
                for key in keys:
                    pipe.zscore(key, str(job.code))
            scores = iter(pipe.execute())
    except redis.RedisError:
        return 0
    woken = 0
    for job, count in zip(parked, listed_on, strict=True):
        if any([next(scores) is not None for _ in range(count)]):
            continue
        queueing.remove(job)  # its fallback wake-up, so the RQ id is not queued twice
        if services.do_resume_job(job, reason="woken by the reconciler: its wait list was lost"):
            woken += 1
    return woken
