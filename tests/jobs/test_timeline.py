"""The run timeline of a job page (jobs.timeline): built from the audit events and the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from jobs import timeline
from jobs.models import Attempt, JobEvent
from tests.factories import submit
from tests.helpers import make_probe_due, run_scheduled_now

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def event(seconds: float, from_status: str, to_status: str, reason: str = "", **data) -> JobEvent:
    return JobEvent(
        created_at=at(seconds),
        from_status=from_status,
        to_status=to_status,
        reason=reason,
        data=data,
    )


def attempt(number: int, start: float, end: float | None, *, error: str = "") -> Attempt:
    return Attempt(
        number=number,
        started_at=at(start),
        ended_at=at(end) if end is not None else None,
        tokens_in=10,
        tokens_out=5,
        cost=Decimal("0.000020"),
        error_class=error,
    )


BREAKER = "circuit breaker open for Sim; retrying at 10:00:40"


def test_a_job_that_waited_on_the_breaker_and_retried_twice():
    events = [
        event(0, "", "queued", "submitted"),
        event(1, "queued", "running", "started", worker="w1"),
        event(3, "running", "waiting", BREAKER),
        event(40, "waiting", "queued", "circuit breaker half-open: probe"),
        event(41, "queued", "running", "started"),
        event(42, "running", "succeeded", "completed"),
    ]
    attempts = [
        attempt(1, 1.1, 1.5, error="server_error"),
        attempt(2, 2.0, 2.5, error="server_error"),
        attempt(3, 41.2, 41.9),
    ]
    steps = timeline.build(events, attempts)

    assert [(s.kind, s.label) for s in steps] == [
        ("queued", "Queued"),
        ("run", "Running"),
        ("wait", "Waiting for the provider's breaker"),
        ("queued", "Queued again"),
        ("run", "Running"),
        ("settled", "Succeeded"),
    ]
    queued, first_run, wait, _, second_run, settled = steps
    assert queued.duration_s == 1
    assert first_run.reason == "on w1"
    assert (wait.wait_kind, wait.reason, wait.duration_s) == ("breaker", BREAKER, 37)
    assert [call.attempt.number for call in first_run.attempts] == [1, 2]
    assert [call.attempt.number for call in second_run.attempts] == [3]
    gaps = [call.gap_s for run in (first_run, second_run) for call in run.attempts]
    assert gaps == [None, pytest.approx(0.5), pytest.approx(38.7)]
    assert second_run.attempts[0].duration_s == pytest.approx(0.7)
    assert second_run.attempts[0].tokens == 15
    assert settled.ended_at == settled.started_at
    assert not any(step.is_current for step in steps)


@pytest.mark.parametrize(
    ("to_status", "reason", "kind"),
    [
        (
            "held",
            "budget 'Monthly' exhausted (1.0 of 1.0 USD this month); held until it frees",
            "budget",
        ),
        ("held", "Provider Sim is out of credit", "credit"),
        ("scheduled", "deferred to the off-peak window (from 22:00)", "off_peak"),
        ("scheduled", "scheduled to start at 2026-12-02 11:00 UTC", "scheduled"),
        ("waiting", "concurrency cap full (3/3) for provider Sim", "capacity"),
        ("waiting", "rate limit (rpm) reached; next slot at 10:00:05", "rate_limit"),
        ("waiting", "provider error (503); retrying at 10:00:07", "backoff"),
        ("waiting", "workload paused", "paused"),
    ],
)
def test_each_wait_names_what_it_waits_for(to_status, reason, kind):
    steps = timeline.build([event(0, "", "queued"), event(1, "queued", to_status, reason)], [])
    assert steps[-1].wait_kind == kind
    assert steps[-1].label == timeline.WAIT_LABELS[kind]


def test_a_recorded_wait_kind_wins_over_the_words_of_the_reason():
    moved = event(1, "queued", "waiting", "something new", wait_kind="rate_limit")
    steps = timeline.build([event(0, "", "queued"), moved], [])
    assert steps[-1].wait_kind == "rate_limit"


def test_the_step_a_job_is_in_lasts_until_now_and_notes_are_not_steps():
    events = [
        event(0, "", "queued", "submitted"),
        event(1, "queued", "running", "started"),
        event(2, "running", "needs_review", "escalated to review: low confidence"),
        event(3, "needs_review", "needs_review", "claimed for review"),
        event(4, "needs_review", "queued", "replayed (run 2)", replay=1),
    ]
    steps = timeline.build(events, [attempt(1, 1.2, 1.8, error="")])
    assert [s.label for s in steps] == ["Queued", "Running", "Sent to review", "Replayed (run 2)"]
    assert steps[-1].is_current
    assert steps[-1].ended_at is None
    assert steps[-1].duration_s > 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("touchy")  # its breaker opens after 2 failures; 1 probe closes it
def test_the_timeline_of_a_real_breaker_wait(redis_conn, workload, user, simulator, run_worker):
    simulator.control(script=[503, 503])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    make_probe_due(workload.provider)
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status == "succeeded"

    steps = timeline.timeline(job)
    waits = [s for s in steps if s.kind == "wait"]
    assert [w.wait_kind for w in waits] == ["breaker"]
    calls = [call for s in steps if s.kind == "run" for call in s.attempts]
    assert [c.attempt.http_status for c in calls] == [503, 503, 200]
    assert calls[0].gap_s is None
    assert all(c.gap_s is not None for c in calls[1:])
    assert steps[-1].label == "Succeeded"
