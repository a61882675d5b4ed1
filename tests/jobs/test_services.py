from __future__ import annotations

from datetime import timedelta

import pytest
import rq
from django.utils import timezone
from rq.job import Job as RQJob

from jobs import queueing, services
from jobs.models import Job, JobEvent
from runs.worker import build_worker
from tests.factories import submit
from tests.helpers import queued_ids

TEXT = "Some meeting notes."


def test_submit_persists_job_and_audit_event(workload, user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        job = submit(workload, user, TEXT)
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED
    assert job.priority == workload.default_priority
    assert job.submitted_by == user
    assert [(e.from_status, e.to_status, e.reason) for e in job.events.all()] == [
        ("", "queued", "submitted")
    ]
    # Enqueue (and the live publish) wait for the commit, so a worker can never see a job
    # that is not saved.
    assert len(callbacks) == 2


def test_submit_uses_priority_override(workload, user):
    job = submit(workload, user, TEXT, priority="high")
    assert job.priority == "high"


@pytest.mark.parametrize(
    ("text", "message"),
    [("   ", "Input is empty."), ("x" * (services.MAX_INPUT_CHARS + 1), "longer than")],
)
def test_submit_rejects_bad_input_and_creates_nothing(workload, user, text, message):
    with pytest.raises(services.SubmitError, match=message):
        services.do_submit_job(workload=workload, input_text=text, user=user)
    assert Job.objects.count() == 0


def test_submit_to_paused_workload_is_refused(workload, user):
    workload.is_paused = True
    workload.save()
    with pytest.raises(services.SubmitError, match="paused"):
        services.do_submit_job(workload=workload, input_text="hi", user=user)
    assert Job.objects.count() == 0


def test_same_idempotency_key_returns_the_existing_job(workload, user):
    first = submit(workload, user, TEXT, idempotency_key="abc")
    again, created = services.do_submit_job(
        workload=workload, input_text=first.input_text, user=user, idempotency_key="abc"
    )
    assert not created
    assert again.pk == first.pk
    assert Job.objects.count() == 1


def test_same_idempotency_key_with_another_input_is_a_conflict(workload, user):
    # Issue 20: answering with the first job would hide the client's bug (the IETF draft: 422).
    first = submit(workload, user, idempotency_key="abc")
    with pytest.raises(services.IdempotencyConflict) as refused:
        services.do_submit_job(
            workload=workload, input_text="different text", user=user, idempotency_key="abc"
        )
    assert refused.value.job == first
    assert Job.objects.count() == 1


def test_idempotency_key_is_per_user(workload, user, other_user):
    first = submit(workload, user, TEXT, idempotency_key="abc")
    second = submit(workload, other_user, TEXT, idempotency_key="abc")
    assert first.pk != second.pk


def test_idempotency_key_older_than_a_day_creates_a_new_job(workload, user):
    first = submit(workload, user, TEXT, idempotency_key="abc")
    Job.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(hours=25))
    second = submit(workload, user, TEXT, idempotency_key="abc")
    assert second.pk != first.pk


def test_transition_is_compare_and_set(workload, user):
    job = submit(workload, user, TEXT)
    stale_copy = Job.objects.get(pk=job.pk)
    assert services.transition(job, ["queued"], "cancelled", reason="first")
    # The loser of the race changes nothing and writes no event.
    assert not services.transition(stale_copy, ["queued"], "running", reason="second")
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert list(job.events.values_list("to_status", flat=True)) == ["queued", "cancelled"]


def test_finish_with_a_stale_run_token_is_ignored(workload, user):
    job = submit(workload, user, TEXT)
    old_token = services.do_start_run(job)
    assert old_token is not None
    # The reconciler decided this run's worker was dead and the job was started again.
    assert services.do_recover_stale_run(job, reason="worker lost")
    new_token = services.do_start_run(job)
    assert not services.do_finish_run(job, old_token, output_text="late", confidence=None)
    assert services.do_finish_run(job, new_token, output_text="fresh", confidence=None)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert job.output_text == "fresh"


def test_cancel_only_unfinished_jobs(workload, user):
    job = submit(workload, user, TEXT)
    assert services.do_cancel_job(job, actor=user)
    assert not services.do_cancel_job(job, actor=user)
    event = JobEvent.objects.filter(job=job, to_status="cancelled").get()
    assert event.actor == user


class _WorkerTakesItAfterTheRead(RQJob):
    """RQ's job class, but a worker takes and runs the job right after `queueing.remove` has
    read its RQ entry: the race of a batch cancel against a busy worker, made certain."""

    run_worker = None

    @classmethod
    def fetch(cls, *args, **kwargs):
        rq_job = super().fetch(*args, **kwargs)
        cls.run_worker()
        return rq_job


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_job_that_a_worker_finishes_meanwhile_does_not_raise(
    redis_conn, workload, user, run_worker, monkeypatch, simulator
):
    job = submit(workload, user, TEXT)
    monkeypatch.setattr(_WorkerTakesItAfterTheRead, "run_worker", staticmethod(run_worker))
    monkeypatch.setattr(queueing, "RQJob", _WorkerTakesItAfterTheRead)

    # Before the fix RQ's Job.cancel() re-read the status of an entry the worker had deleted
    # (result_ttl 0) and raised InvalidJobOperation out of the cancel.
    assert services.do_cancel_job(job, actor=user)

    job.refresh_from_db()
    assert job.status == "cancelled"
    assert simulator.counters()["requests_total"] == 0  # the run saw the cancel, no call
    assert queued_ids() == []


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_job_a_worker_has_taken_leaves_its_rq_entry_to_the_worker(
    redis_conn, workload, user, simulator
):
    job = submit(workload, user, TEXT)
    # A threaded worker's main thread popped the id; the run has not started yet, so the
    # entry still says queued (runs.worker.Worker.execute_job).
    taken, rq_queue = rq.Queue.dequeue_any(
        [queueing.queue(job.priority)], None, connection=queueing.connection()
    )
    assert taken.id == job.rq_job_id

    assert services.do_cancel_job(job, actor=user)

    # The entry is the worker's: deleting it under the run made RQ's own cleanup fail.
    assert taken.get_status() == "queued"
    build_worker(name="test-worker-taken", inline=True).execute_job(taken, rq_queue)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert simulator.counters()["requests_total"] == 0
    assert not redis_conn.exists(taken.key)  # RQ cleaned up after the run (result_ttl 0)


def test_a_scheduled_job_says_when_it_starts_as_people_read_it(redis_conn, workload, user):
    start = timezone.now().replace(microsecond=0) + timedelta(days=40)
    job = services.do_submit_job(workload=workload, input_text="Later.", user=user, start_at=start)[
        0
    ]
    job.refresh_from_db()
    assert job.status == "scheduled"
    assert job.wait_reason == f"scheduled to start at {start:%Y-%m-%d %H:%M} UTC"
