"""A running job that is cancelled or passes its deadline stops: its call, streamed or not, is
cut off at the next heartbeat, the job keeps the status it was given, the call is charged what
the provider reported or else what was reserved for it, and its page ends showing that.

The simulator streams slowly here (a chunk every 250 ms, 14+ chunks), so a run that was not
cut would take seconds longer than one that was."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs import services
from jobs.flow import budgets
from jobs.models import Attempt, Budget, Job
from tests.helpers import start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = " ".join(
    f"Paragraph {i} of the quarterly review covers hiring, budget and risk." for i in range(12)
)
CHUNK_DELAY_MS = 250


@pytest.fixture
def slow_stream(simulator):
    simulator.control(stream_chunk_delay_ms=CHUNK_DELAY_MS)
    return simulator


def full_stream(workload, user, run_worker) -> tuple[float, int]:
    """How long the same job takes when nothing stops it, and how many tokens it streams (the
    baseline for the cut: a cut call streams fewer, whatever the machine's load)."""
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    started = time.monotonic()
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    return time.monotonic() - started, Attempt.objects.get(job=job).tokens_out


def in_background(action) -> threading.Thread:
    """Run `action` in a thread (the worker under test runs in this one, as RQ wants the main
    thread for its signal handlers)."""

    def target() -> None:
        try:
            action()
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def when_streaming(job: Job, then) -> None:
    wait_for(lambda: Job.objects.get(pk=job.pk).stage == "streaming", timeout=20)
    then()


def test_cancelling_a_running_job_cuts_its_streamed_call(
    redis_conn, workload, user, slow_stream, run_worker, settings
):
    settings.AIQUEUE_HEARTBEAT_INTERVAL = 0.2
    baseline, full_tokens = full_stream(workload, user, run_worker)
    assert baseline > 3  # the stream is long enough for a cut to show
    Budget.objects.create(name="Global", cap_usd=10)  # to see the reservation given back
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    assert job.cost_reserved > 0
    cancelled_at: list[float] = []

    def cancel() -> None:
        services.do_cancel_job(Job.objects.get(pk=job.pk), actor=user, reason="not needed")
        cancelled_at.append(time.monotonic())

    helper = in_background(lambda: when_streaming(job, cancel))
    run_worker()
    finished_at = time.monotonic()
    helper.join(timeout=5)

    job.refresh_from_db()
    assert job.status == "cancelled"
    # Cut at a heartbeat (0.2 s each), before the stream had ended: sooner than it took.
    attempt = Attempt.objects.get(job=job)
    assert attempt.error_class == "cut_off"
    assert finished_at - cancelled_at[0] < baseline
    # The provider's usage report never came: the call is charged at its reservation (what
    # it may have generated before it noticed), and the budget agrees with the ledger.
    assert attempt.tokens_out == workload.max_output_tokens
    assert attempt.tokens_out >= full_tokens
    assert attempt.cost > 0
    assert job.cost_actual == attempt.cost
    assert job.cost_reserved == 0
    budget = Budget.objects.get()
    assert budget.reserved_nanos == 0
    assert budget.spent_nanos == budgets.usd_to_nanos(attempt.cost)


def test_a_running_job_past_its_deadline_expires_and_its_call_is_cut(
    redis_conn, workload, user, slow_stream, run_worker, settings
):
    settings.AIQUEUE_HEARTBEAT_INTERVAL = 0.2
    baseline, full_tokens = full_stream(workload, user, run_worker)
    deadline = timezone.now() + timedelta(seconds=2.5)
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user, deadline=deadline)[
        0
    ]

    run_worker()
    ended = timezone.now()

    job.refresh_from_db()
    assert job.status == "expired"
    assert job.output_text == ""  # the answer that would have come later is not written
    assert (ended - job.created_at).total_seconds() < baseline
    event = job.events.get(to_status="expired")
    assert event.from_status == "running"
    assert event.reason == "deadline passed while running"
    # The call was cut at the deadline: by its read timeout, clamped to the deadline, or by
    # the heartbeat that expired the job, whichever came first.
    attempt = Attempt.objects.get(job=job)
    assert attempt.error_class in {"timeout", "cut_off"}
    if attempt.error_class == "timeout":
        # What had streamed before the timeout, at one token per byte at most (jobs.costs).
        assert attempt.tokens_out > 0
    else:
        assert attempt.tokens_out == workload.max_output_tokens  # charged as reserved
    assert attempt.ended_at < job.created_at + timedelta(seconds=baseline)
    assert attempt.cost > 0


def test_a_job_whose_deadline_is_too_close_for_a_call_expires_without_calling(
    redis_conn, workload, user, simulator, run_worker
):
    job = services.do_submit_job(
        workload=workload,
        input_text=TEXT,
        user=user,
        deadline=timezone.now() + timedelta(seconds=30),
    )[0]
    # The deadline moves to within the minimum call time after the job was admitted.
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() + timedelta(seconds=1))
    run_worker()
    job.refresh_from_db()
    assert job.status == "expired"
    assert simulator.counters()["requests_total"] == 0
    assert not Attempt.objects.filter(job=job).exists()


def test_threaded_worker_cuts_a_cancelled_run_at_its_heartbeat(
    redis_conn, workload, user, slow_stream, tmp_path
):
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    worker = start_worker(tmp_path, threads=4)
    try:
        wait_for(lambda: Job.objects.get(pk=job.pk).stage == "streaming", timeout=30)
        services.do_cancel_job(Job.objects.get(pk=job.pk), actor=user)
        cancelled = time.monotonic()
        wait_for(lambda: Attempt.objects.filter(job=job, ended_at__isnull=False).exists(), 10)
        cut_after = time.monotonic() - cancelled
    finally:
        stop(worker)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert Attempt.objects.get(job=job).error_class == "cut_off"
    assert cut_after < 2.5  # heartbeat every 1 s in this worker; the stream had seconds left


def test_cancelling_a_call_that_does_not_stream_aborts_it(
    redis_conn, provider, user, simulator, run_worker, settings, monkeypatch
):
    """A classify call does not stream: it used to run to its end (here 20 s) and be paid for,
    its answer thrown away. The heartbeat now aborts it, it is charged at its reservation, and
    the job's page is last told the truth: cancelled, with that attempt and its cost."""
    from jobs import live
    from jobs.models import Workload

    settings.AIQUEUE_HEARTBEAT_INTERVAL = 0.2
    classifier = Workload.objects.create(
        name="Tickets",
        kind=Workload.Kind.CLASSIFY,
        labels=["billing", "bug"],
        provider=provider,
        model="sim-small",
        max_output_tokens=5,
    )
    simulator.control(latency_ms=20_000)
    job = services.do_submit_job(workload=classifier, input_text="I was charged twice", user=user)[
        0
    ]
    published: list[tuple[str, int]] = []
    real_publish = live.publish_job

    def recording_publish(job_or_pk, **kwargs):
        pk = getattr(job_or_pk, "pk", job_or_pk)
        published.append((Job.objects.get(pk=pk).status, Attempt.objects.filter(job_id=pk).count()))
        return real_publish(job_or_pk, **kwargs)

    monkeypatch.setattr(live, "publish_job", recording_publish)

    def cancel() -> None:
        # The request is out, waiting for the answer: the simulator holds it (a fixed sleep
        # after the "calling" stage was not enough on a loaded machine: the cancel came first).
        wait_for(lambda: simulator.counters()["in_flight"] == 1, timeout=20)
        services.do_cancel_job(Job.objects.get(pk=job.pk), actor=user, reason="not needed")

    helper = in_background(cancel)
    run_worker()
    helper.join(timeout=5)

    job.refresh_from_db()
    assert job.status == "cancelled"
    # Aborted, not answered: the simulator saw the client go (it would have answered after
    # 20 s, and an answered call never counts as disconnected).
    wait_for(lambda: simulator.counters()["disconnected"] == 1, timeout=15)
    attempt = Attempt.objects.get(job=job)
    assert attempt.error_class == "cut_off"
    assert attempt.tokens_out == classifier.max_output_tokens  # no usage came: the reservation
    assert attempt.cost > 0
    assert job.cost_actual == attempt.cost
    assert published[-1] == ("cancelled", 1)  # the page's last word has the attempt
