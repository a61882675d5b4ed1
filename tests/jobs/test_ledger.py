"""The write-ahead ledger (jobs.ledger) and the reconciler's stall rule, on the suite's database:
a call's row exists, with its worst case counted on the budgets, before the request leaves;
lost calls are charged at their reservation; late answers are superseded; a silent run is
recovered only when its calls can no longer be answered, or its process is known dead."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from jobs import ledger, processes, services
from jobs.flow import budgets
from jobs.models import Attempt, Budget, Job
from runs import reconcile, retries

pytestmark = pytest.mark.django_db


def running_job(workload, user) -> Job:
    job = services.do_submit_job(workload=workload, input_text="notes to summarize", user=user)[0]
    assert services.do_start_run(job)
    assert services.do_begin_attempt(job)
    return job


def open_call(job: Job, *, deadline_in: float = 60) -> Attempt:
    return ledger.open_attempt(
        job,
        provider=job.workload.provider,
        model=job.workload.model,
        reserved_cost=budgets.estimate_for(job).usd,
        deadline_at=timezone.now() + timedelta(seconds=deadline_in),
    )


def settle(attempt: Attempt, cost: str) -> str:
    attempt.ended_at = timezone.now()
    attempt.http_status = 200
    attempt.tokens_in, attempt.tokens_out = 10, 20
    attempt.cost = Decimal(cost)
    return ledger.settle(attempt)


def test_a_call_cancelled_mid_flight_keeps_its_worst_case_reserved_until_it_settles(workload, user):
    budget = Budget.objects.create(name="Global", cap_usd=10)
    job = running_job(workload, user)
    call = open_call(job)
    worst = budgets.usd_to_nanos(call.reserved_cost)
    assert worst > 0

    services.do_cancel_job(job, actor=user)
    budget.refresh_from_db()
    assert budget.reserved_nanos >= worst  # the call may still be billed

    assert settle(call, "0.000010") == "settled"
    budgets.release(job)  # what the run's end does (admission.finish)
    budget.refresh_from_db()
    assert budget.reserved_nanos == 0
    assert budget.spent_nanos == budgets.usd_to_nanos(Decimal("0.000010"))


def test_a_lost_call_is_charged_at_its_reservation_and_a_late_answer_corrects_it(workload, user):
    budget = Budget.objects.create(name="Global", cap_usd=10)
    job = running_job(workload, user)
    call = open_call(job)

    assert services.do_recover_stale_run(job, reason="worker lost", lost_calls="it died")
    call.refresh_from_db()
    assert call.state == "unknown"
    assert call.error_message == "outcome unknown: charged as reserved (it died)"
    assert call.cost == call.reserved_cost
    assert not call.consumes_attempt
    budget.refresh_from_db()
    assert budget.spent_nanos == budgets.usd_to_nanos(call.reserved_cost)

    assert settle(call, "0.000010") == "superseded"  # the stalled worker read its answer
    call.refresh_from_db()
    job.refresh_from_db()
    budget.refresh_from_db()
    assert call.cost == Decimal("0.000010")
    assert job.cost_actual == Decimal("0.000010")
    assert budget.spent_nanos == budgets.usd_to_nanos(Decimal("0.000010"))
    assert job.status == "queued"  # the late answer did not touch the job


def test_lost_and_superseded_calls_do_not_use_up_the_jobs_attempts(workload, user):
    job = running_job(workload, user)
    open_call(job)
    services.do_recover_stale_run(job, reason="worker lost")
    job.refresh_from_db()
    assert job.attempt_count == 1
    assert retries.attempts_used(job) == 0


def stale(job: Job, run_by: str) -> None:
    Job.objects.filter(pk=job.pk).update(
        heartbeat_at=timezone.now() - timedelta(minutes=5), run_by=run_by
    )


def dead_process() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = f"{processes.host_prefix()}{child.pid}/1"
    child.wait()
    return identity


def test_a_silent_run_whose_call_may_still_be_answered_is_not_recovered(workload, user, redis_conn):
    job = running_job(workload, user)
    open_call(job, deadline_in=30)
    stale(job, processes.identity())  # alive (this process), as a stalled worker is
    assert reconcile.run().recovered == 0
    assert Job.objects.get(pk=job.pk).status == "running"


def test_a_silent_run_is_recovered_once_its_calls_deadline_has_passed(workload, user, redis_conn):
    job = running_job(workload, user)
    call = open_call(job, deadline_in=-1)
    stale(job, "another-host/123/456")
    assert reconcile.run().recovered == 1
    call.refresh_from_db()
    assert call.state == "unknown"
    assert job.events.filter(reason="worker lost: heartbeat stopped").exists()


def test_the_runs_of_a_dead_process_on_this_host_come_back_at_once(workload, user, redis_conn):
    job = running_job(workload, user)
    open_call(job, deadline_in=30)
    # Not even stale yet: the process is gone, so no answer can come.
    Job.objects.filter(pk=job.pk).update(run_by=dead_process())
    assert reconcile.recover_dead_local() == 1
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.events.filter(reason="worker lost: its process is gone").exists()
    assert Attempt.objects.get(job=job).state == "unknown"


def test_a_process_that_still_exists_is_not_taken_for_dead():
    assert not processes.is_dead(processes.identity())
    assert processes.is_dead(dead_process())
    assert not processes.is_dead("another-host/1/1")
