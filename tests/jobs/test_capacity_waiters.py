"""Capacity waiters wake when they may fit: a cap raised or removed, a Redis that lost the wait
lists; and a deferrable job counts parked jobs as the backlog they are."""

from __future__ import annotations

import pytest
from django.utils import timezone

from jobs.flow import leases
from jobs.models import Job
from runs import reconcile
from tests.factories import submit
from tests.helpers import occupy

pytestmark = pytest.mark.django_db(transaction=True)


def park_on_a_full_cap(workload, user, run_worker, count: int) -> list[Job]:
    workload.concurrency_cap = 1
    workload.save()
    occupy(leases.resources_for(workload))
    jobs = [submit(workload, user) for _ in range(count)]
    run_worker()
    assert set(Job.objects.values_list("status", flat=True)) == {"waiting"}
    return jobs


def statuses() -> list[str]:
    return sorted(Job.objects.values_list("status", flat=True))


def test_removing_a_cap_wakes_every_job_parked_on_it(redis_conn, workload, user, run_worker):
    park_on_a_full_cap(workload, user, run_worker, 4)

    workload.concurrency_cap = None
    workload.save()

    assert statuses() == ["queued"] * 4
    run_worker()
    assert statuses() == ["succeeded"] * 4


def test_raising_a_cap_wakes_as_many_as_now_fit(redis_conn, workload, user, run_worker):
    first, second, third = park_on_a_full_cap(workload, user, run_worker, 3)

    workload.concurrency_cap = 3  # one slot is held by another run
    workload.save()

    assert statuses() == ["queued", "queued", "waiting"]
    third.refresh_from_db()
    assert third.status == "waiting"  # the last in line


def test_removing_a_providers_cap_wakes_its_waiters(redis_conn, workload, user, run_worker):
    workload.provider.max_concurrency = 1
    workload.provider.save()
    occupy(leases.resources_for(workload))
    for _ in range(3):
        submit(workload, user)
    run_worker()
    assert statuses() == ["waiting"] * 3

    workload.provider.max_concurrency = None
    workload.provider.save()

    assert statuses() == ["queued"] * 3


def test_after_a_redis_wipe_capacity_waiters_wake_at_the_next_pass(
    redis_conn, workload, user, run_worker
):
    jobs = park_on_a_full_cap(workload, user, run_worker, 3)
    assert all(job.resume_at > timezone.now() for job in Job.objects.all())

    redis_conn.flushdb()
    report = reconcile.run()

    assert report.woken == 3
    assert statuses() == ["queued"] * 3
    run_worker()
    assert statuses() == ["succeeded"] * 3
    assert len(jobs) == 3


def test_a_waiter_still_on_its_list_is_left_to_wait(redis_conn, workload, user, run_worker):
    park_on_a_full_cap(workload, user, run_worker, 2)
    assert reconcile.run().woken == 0
    assert statuses() == ["waiting", "waiting"]


def test_a_deferrable_job_counts_parked_jobs_as_backlog(
    redis_conn, workload, user, run_worker, settings, provider
):
    park_on_a_full_cap(workload, user, run_worker, 6)
    now = timezone.localtime()
    settings.AIQUEUE_OFFPEAK_START = (now.hour + 2) % 24
    settings.AIQUEUE_OFFPEAK_END = (now.hour + 4) % 24
    settings.AIQUEUE_DEFER_QUEUE_BELOW = 5
    deferrable = type(workload).objects.create(
        name="Nightly", kind=workload.kind, provider=provider, model="sim-small",
        is_deferrable=True, max_output_tokens=50,
    )  # fmt: skip
    job = submit(deferrable, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "scheduled"
    assert job.wait_reason.startswith("deferred to the off-peak window")
