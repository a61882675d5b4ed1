"""The threaded worker's shared heartbeat (runs.heartbeats.RunHeartbeats), in-process: one
UPDATE for every run in flight, and each run told whether to go on."""

from __future__ import annotations

import threading
from datetime import timedelta

from django.utils import timezone

from jobs import services
from jobs.models import Job
from runs import heartbeats
from runs.heartbeats import LOST, RunHeartbeats
from tests.helpers import wait_for


def started(workload, user, **fields) -> tuple[Job, object]:
    job = services.do_submit_job(workload=workload, input_text="notes", user=user)[0]
    if fields:
        Job.objects.filter(pk=job.pk).update(**fields)
        job.refresh_from_db()
    token = services.do_start_run(job)
    assert token is not None
    return job, token


def test_a_beat_refreshes_the_running_and_tells_the_others_to_stop(workload, user):
    long_ago = timezone.now() - timedelta(minutes=5)
    running, running_token = started(workload, user)
    cancelled, cancelled_token = started(workload, user)
    late, late_token = started(workload, user, deadline=timezone.now() + timedelta(seconds=30))
    Job.objects.filter(pk__in=[running.pk, cancelled.pk, late.pk]).update(heartbeat_at=long_ago)
    assert services.do_cancel_job(cancelled, actor=user)
    Job.objects.filter(pk=late.pk).update(deadline=timezone.now() - timedelta(seconds=1))

    calls: list[tuple[str, str]] = []
    beats = RunHeartbeats()
    beats.add(running.pk, running_token, lambda: calls.append(("beat", "running")))
    beats.add(cancelled.pk, cancelled_token, None, lambda why: calls.append(("lost", why)))
    beats.add(late.pk, late_token, None, lambda why: calls.append(("lost", why)))

    assert beats.beat() == 1  # one row refreshed: the only run still its job's
    assert sorted(calls) == [("beat", "running"), ("lost", LOST), ("lost", LOST)]
    running.refresh_from_db()
    assert running.heartbeat_at > long_ago
    cancelled.refresh_from_db()
    assert cancelled.heartbeat_at == long_ago
    late.refresh_from_db()
    assert late.status == Job.Status.EXPIRED  # the beat expired the run past its deadline
    # The lost runs were told once and are no longer beaten for; the live one still is.
    calls.clear()
    assert set(beats.snapshot()) == {running_token}
    assert beats.beat() == 1
    assert calls == [("beat", "running")]


def test_a_run_outside_the_worker_is_beaten_by_the_process_heartbeat(
    workload, user, settings, transactional_db
):
    settings.AIQUEUE_HEARTBEAT_INTERVAL = 0.1
    job, token = started(workload, user)
    long_ago = timezone.now() - timedelta(minutes=5)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=long_ago)
    lost = threading.Event()
    heartbeats.install(None)
    beats = heartbeats.for_this_process()
    try:
        assert heartbeats.for_this_process() is beats  # one per process
        beats.add(job.pk, token, on_lost=lambda why: lost.set())
        wait_for(lambda: Job.objects.get(pk=job.pk).heartbeat_at > long_ago, timeout=5)
        assert services.do_cancel_job(job, actor=user)
        assert lost.wait(timeout=5)  # told at its next beat, as inside the worker
    finally:
        heartbeats.install(None)


def test_a_failing_callback_does_not_stop_the_other_runs_beats(workload, user):
    first, first_token = started(workload, user)
    second, second_token = started(workload, user)
    called = []

    def broken() -> None:
        raise RuntimeError("lease renewal failed")

    beats = RunHeartbeats()
    beats.add(first.pk, first_token, broken)
    beats.add(second.pk, second_token, lambda: called.append(second.pk))
    assert beats.beat() == 2
    assert called == [second.pk]

    beats.remove(first_token)
    beats.remove(second_token)
    assert beats.snapshot() == {}
    assert beats.beat() == 0
