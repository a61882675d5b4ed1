"""The one retry layer (runs.retries) end to end: the suite's Redis, the real worker code, the
simulator over real HTTP, and for the retry budget two real worker processes."""

from __future__ import annotations

import sys
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import F
from django.utils import timezone
from rq import Worker as RQWorker

from bench import naive_retries
from jobs import services
from jobs.flow import retry_budget
from jobs.models import Attempt, Job
from jobs.providers.base import structured_confidence
from runs import retries
from tests.factories import submit
from tests.helpers import ENDED, http_statuses, run_scheduled_now, spawn, wait_for, worker_env

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_backoff(settings):
    # Backoff of a few ms: the tests see which waits come from the provider (Retry-After).
    settings.AIQUEUE_RETRY_BACKOFF_BASE_MS = 5
    settings.AIQUEUE_MAX_INLINE_RETRY_WAIT = 5


def test_429_with_retry_after_is_honoured_before_the_next_call(
    redis_conn, workload, user, simulator, run_worker
):
    simulator.control(script=[{"status": 429, "retry_after": 1}])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    first, second = job.attempts.order_by("number")
    assert (first.http_status, second.http_status) == (429, 200)
    # Backoff alone would wait a few ms; the provider asked for 1 s.
    assert (second.started_at - first.ended_at) >= timedelta(seconds=1)


def test_paid_failures_use_up_max_attempts_then_end_with_the_error(
    redis_conn, workload, user, simulator, run_worker
):
    # A read timeout after the provider accepted the request may have been generated: paid.
    workload.max_attempts = 2
    workload.save()
    workload.provider.read_timeout_s = 0.5
    workload.provider.save()
    simulator.control(script=[{"hang": 3}, {"hang": 3}, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status in ENDED
    assert list(job.attempts.values_list("error_class", "is_billed")) == [("timeout", True)] * 2
    assert simulator.counters()["requests_total"] == 2
    assert job.error.startswith("gave up after 2 paid attempts: timeout")


def test_free_failures_do_not_use_up_paid_attempts(
    redis_conn, workload, user, simulator, run_worker
):
    """Error answers cost nothing: a job with one paid attempt waits through them."""
    workload.max_attempts = 1
    workload.save()
    workload.provider.breaker_failure_threshold = 100  # the breaker is not what this is about
    workload.provider.save()
    simulator.control(script=[503, 502, 503, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert http_statuses(job) == [503, 502, 503, 200]
    assert list(job.attempts.values_list("is_billed", flat=True)) == [False, False, False, True]


def test_free_failures_across_a_park_do_not_use_up_paid_attempts(
    redis_conn, workload, user, simulator, run_worker
):
    workload.max_attempts = 1
    workload.save()
    simulator.control(script=[{"status": 429, "retry_after": 30}, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert http_statuses(job) == [429, 200]


def test_backoff_is_full_jitter_under_an_exponential_bound(settings):
    settings.AIQUEUE_RETRY_BACKOFF_BASE_MS = 100
    for attempt in range(1, 6):
        bound = 0.1 * 2 ** (attempt - 1)
        waits = [retries.backoff(attempt) for _ in range(200)]
        assert all(0 <= w <= bound for w in waits)
        # Full jitter spreads the waits over the whole range, not around one value.
        assert max(waits) - min(waits) > bound / 2


def test_400_is_not_retried(redis_conn, workload, user, simulator, run_worker):
    simulator.control(script=[400, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status in ENDED
    assert http_statuses(job) == [400]
    assert simulator.counters()["requests_total"] == 1
    assert job.error_class == "http_400"


def test_long_retry_after_parks_the_job_instead_of_sleeping(
    redis_conn, workload, user, simulator, run_worker
):
    simulator.control(script=[{"status": 429, "retry_after": 30}])
    job = submit(workload, user)
    before = timezone.now()
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason.startswith("rate limited by provider; retrying at ")
    assert job.resume_at >= before + timedelta(seconds=30)
    assert http_statuses(job) == [429]
    # The wake-up survived the cleanup of the RQ entry that was running the job.
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert list(job.attempts.values_list("number", flat=True)) == [1, 2]
    assert http_statuses(job) == [429, 200]


def test_paid_attempts_count_across_a_park_and_resume(
    redis_conn, workload, user, simulator, run_worker
):
    workload.max_attempts = 2
    workload.save()
    workload.provider.read_timeout_s = 0.5
    workload.provider.save()
    simulator.control(script=[{"hang": 3}, {"status": 429, "retry_after": 30}, {"hang": 3}, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status in ENDED
    assert http_statuses(job) == [None, 429, None]
    assert job.error.startswith("gave up after 2 paid attempts")


def test_a_call_after_a_park_counts_as_a_retry_for_the_budget(
    redis_conn, workload, user, simulator, run_worker, settings
):
    """The resumed job's call is its second: a retry, which a budget with no room refuses."""
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 0
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    simulator.control(script=[{"status": 429, "retry_after": 30}])
    job = submit(workload, user)
    run_worker()
    run_scheduled_now(Job.objects.get(pk=job.pk), run_worker)
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason.startswith(f"retry budget of {workload.provider.name} exhausted")
    assert http_statuses(job) == [429]
    assert simulator.counters()["requests_total"] == 1
    assert retry_budget.usage(workload.provider)["retries"] == 0


def test_a_call_after_a_failed_call_from_an_earlier_run_counts_as_a_retry_for_the_budget(
    redis_conn, workload, user, simulator, run_worker, settings
):
    """The ledger, not the run, says whether a call is a retry: a job whose earlier run's
    call failed (its attempt written, its run gone) retries on its next call."""
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 0
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    job = submit(workload, user)
    Attempt.objects.create(
        job=job, number=1, provider=workload.provider, model="sim-small",
        started_at=timezone.now() - timedelta(minutes=1), error_class="ProviderError",
        state=Attempt.State.SETTLED,
    )  # fmt: skip
    Job.objects.filter(pk=job.pk).update(attempt_count=1)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason.startswith(f"retry budget of {workload.provider.name} exhausted")
    assert simulator.counters()["requests_total"] == 0


def test_a_recovery_after_a_worker_died_is_a_retry_the_budget_records_but_never_refuses(
    redis_conn, workload, user, simulator, run_worker, settings
):
    """A call cut short by its dead worker (settled `unknown`, not consuming an attempt) is
    followed by a recovery call even when the budget has no room: a killed worker with many
    calls in flight must not hold its jobs for minutes. The budget still counts it: when the
    recovery fails, the retry after it is refused like any other."""
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 0
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    job = submit(workload, user)
    Attempt.objects.create(
        job=job, number=1, provider=workload.provider, model="sim-small",
        started_at=timezone.now() - timedelta(minutes=1), error_class="OutcomeUnknown",
        state=Attempt.State.UNKNOWN, is_billed=True, consumes_attempt=False,
    )  # fmt: skip
    Job.objects.filter(pk=job.pk).update(attempt_count=1)
    simulator.control(script=[503])
    run_worker()
    job.refresh_from_db()
    assert simulator.counters()["requests_total"] == 1  # the recovery was made
    assert retry_budget.usage(workload.provider)["retries"] == 1  # and counted
    assert job.status == "waiting"  # the retry after it found no room
    assert job.wait_reason.startswith(f"retry budget of {workload.provider.name} exhausted")


def test_a_retry_that_succeeds_gives_its_budget_back(
    redis_conn, workload, user, simulator, run_worker, settings
):
    """The budget bounds retries that fail: with room for one retry a minute, two jobs whose
    retries succeed both get theirs."""
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 1
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    simulator.control(script=[503, 200, 503, 200])
    first = submit(workload, user, "first meeting")
    run_worker()
    second = submit(workload, user, "second meeting")
    run_worker()
    for job in (first, second):
        job.refresh_from_db()
        assert job.status == "succeeded"
        assert http_statuses(job) == [503, 200]


def test_jobs_waiting_for_budget_room_are_woken_when_a_retry_succeeds(
    redis_conn, workload, user, simulator, settings
):
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 1
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    provider = workload.provider
    in_flight = retry_budget.acquire(provider, is_retry=True)
    assert in_flight.allowed
    waiting = submit(workload, user)
    denied = retry_budget.acquire(provider, is_retry=True, waiter=waiting)
    assert not denied.allowed
    assert retry_budget.usage(provider) == {"calls": 1, "retries": 1, "waiting": 1}
    # The retry in flight succeeds: its place is free again, and the waiter is popped.
    assert retry_budget.refund(provider, in_flight.member) == [str(waiting.code)]
    assert retry_budget.acquire(provider, is_retry=True, waiter=waiting).allowed
    assert retry_budget.usage(provider) == {"calls": 2, "retries": 1, "waiting": 0}


def test_the_deadline_ends_the_wait_and_the_job_says_why(
    redis_conn, workload, user, simulator, run_worker, settings
):
    settings.AIQUEUE_RETRY_BUDGET_WAIT = 600
    simulator.control(outage=True)
    job = submit(workload, user)
    deadline = timezone.now() + timedelta(seconds=60)
    Job.objects.filter(pk=job.pk).update(deadline=deadline)
    run_worker()
    job.refresh_from_db()
    # An outage alone does not end the job: it waits, and never sleeps past its deadline.
    assert job.status == "waiting"
    assert job.resume_at <= deadline
    assert not job.attempts.filter(is_billed=True).exists()

    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status == "expired"
    name = workload.provider.name
    assert job.error.startswith(
        f"The deadline passed while waiting for {name}, whose last call failed: 503"
    )
    assert job.events.last().reason == f"deadline passed while {name} was failing"


def test_the_reconciler_expires_a_job_waiting_past_its_deadline_saying_why(
    redis_conn, workload, user, simulator, run_worker
):
    from runs import reconcile

    simulator.control(outage=True)
    job = submit(workload, user)
    run_worker()
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    reconcile.run()
    job.refresh_from_db()
    assert job.status == "expired"
    assert f"waiting for {workload.provider.name}, whose last call failed: 503" in job.error


def test_the_longest_wait_sends_the_job_to_review_saying_so(
    redis_conn, workload, user, simulator, run_worker, settings
):
    settings.AIQUEUE_RETRY_MAX_WAIT = 60
    simulator.control(outage=True)
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    first_failure = job.attempts.order_by("number").first().started_at
    assert job.resume_at <= first_failure + timedelta(seconds=60)

    # It has been failing for three minutes by the time it wakes.
    Attempt.objects.filter(job=job).update(started_at=F("started_at") - timedelta(minutes=3))
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status in ENDED
    assert job.error.startswith(
        f"gave up after waiting 3 min for {workload.provider.name}: its calls kept failing "
        "without a paid answer (last: 503"
    )
    assert not job.attempts.filter(is_billed=True).exists()


def test_job_page_shows_the_wait_reason_and_resume_time(
    redis_conn, workload, user, user_client, simulator, run_worker
):
    simulator.control(script=[{"status": 429, "retry_after": 60}])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    page = user_client.get(job.get_absolute_url()).content.decode()
    assert "Waiting" in page
    assert "rate limited by provider; retrying at" in page
    assert timezone.localtime(job.resume_at).strftime("%H:%M:%S") in page


def test_every_attempt_lands_in_the_ledger_with_usage_and_cost(
    redis_conn, workload, user, simulator, run_worker
):
    simulator.control(script=[503, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    failed, ok = job.attempts.order_by("number")
    assert (failed.http_status, failed.error_class, failed.cost) == (503, "http_503", 0)
    assert failed.latency_ms is not None
    assert failed.ended_at is not None
    assert ok.http_status == 200
    assert ok.tokens_in > 0
    assert ok.tokens_out > 0
    assert ok.cost == (ok.tokens_in * Decimal(1) + ok.tokens_out * Decimal(2)) / 1_000_000
    assert job.cost_actual == failed.cost + ok.cost


def test_missing_api_key_is_a_clear_configuration_error_on_the_job(
    redis_conn, workload, user, simulator, run_worker, monkeypatch
):
    monkeypatch.delenv("TEST_UNSET_API_KEY", raising=False)
    workload.provider.api_key_env = "TEST_UNSET_API_KEY"
    workload.provider.save()
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status in ENDED
    assert job.error_class == "configuration"
    assert "TEST_UNSET_API_KEY is not set" in job.error
    assert not job.attempts.exists()
    assert simulator.counters()["requests_total"] == 0


def test_retry_over_the_budget_parks_the_job_instead_of_retrying(
    redis_conn, workload, user, simulator, run_worker, settings
):
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 1
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    workload.max_attempts = 5
    workload.save()
    simulator.control(script=[503, 503, 503])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason.startswith(f"retry budget of {workload.provider.name} exhausted")
    assert http_statuses(job) == [503, 503]  # the first call and the one retry the floor allows
    assert retry_budget.usage(workload.provider) == {"calls": 2, "retries": 1, "waiting": 1}


def test_naive_policy_retries_each_call_three_times_without_budget(
    redis_conn, workload, user, simulator, run_worker, settings
):
    settings.AIQUEUE_RETRY_POLICY = naive_retries.POLICY
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 0
    simulator.control(script=[503, 503, 503, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert http_statuses(job) == [503, 503, 503, 200]


def test_confidence_from_a_structured_answer():
    assert structured_confidence('{"label": "bug", "confidence": 0.82}') == 0.82
    assert structured_confidence('{"confidence": 75}') == 0.75
    assert structured_confidence('{"confidence": "high"}') is None
    assert structured_confidence("confidence: 0.9") is None


def test_read_timeout_must_stay_below_the_job_timeout(workload):
    from django.core.exceptions import ValidationError

    workload.timeout_s = 30
    workload.provider.read_timeout_s = 30
    with pytest.raises(ValidationError) as error:
        workload.full_clean()
    assert "provider" in error.value.message_dict
    workload.provider.read_timeout_s = 29
    workload.full_clean()
    workload.save()
    workload.provider.read_timeout_s = 45
    with pytest.raises(ValidationError) as error:
        workload.provider.full_clean()
    assert "read_timeout_s" in error.value.message_dict


# Worker processes read the jobs: they must be committed.
@pytest.mark.django_db(transaction=True)
def test_retry_budget_caps_retries_across_two_worker_processes(
    redis_conn, workload, user, simulator, tmp_path
):
    """Ten jobs whose calls all fail, run by two worker processes: the retry budget (a
    floor of 3 retries a minute, no ratio) lets exactly 3 retries through in total."""
    workload.provider.retry_budget_ratio = 0
    workload.provider.breaker_failure_threshold = 100
    workload.provider.breaker_min_calls = workload.provider.breaker_window_calls = 20
    workload.provider.save()
    workload.max_attempts = 5
    workload.save()
    simulator.control(latency_ms=150, script=[503] * 20)
    env = {
        **worker_env(heartbeat=1, stale_after=30),
        "AIQUEUE_RETRY_BUDGET_FLOOR": "3",
        "AIQUEUE_RETRY_BUDGET_WAIT": "600",
        "AIQUEUE_RETRY_BACKOFF_BASE_MS": "5",
    }
    # Two threads each, so that neither process can take all ten jobs at once; and jobs are
    # submitted only once both wait on the queues (Redis hands a push to the longest waiter),
    # or a process still in its first maintenance pass left every job to the other (CI, once).
    args = [sys.executable, "manage.py", "worker", "--no-scheduler", "--threads", "2"]
    workers = [spawn(args, tmp_path, env), spawn(args, tmp_path, env)]
    try:
        wait_for(lambda: len(RQWorker.all(connection=redis_conn)) == 2, timeout=90)
        wait_for(
            lambda: sum(c.get("cmd") == "blpop" for c in redis_conn.client_list()) >= 2,
            timeout=60,
        )
        jobs = [submit(workload, user, f"meeting notes {i}") for i in range(10)]
        wait_for(
            lambda: not Job.objects.filter(status__in=["queued", "running"]).exists(),
            timeout=120,
        )
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=15)
    started_by = {
        event.data.get("worker") for job in jobs for event in job.events.filter(to_status="running")
    }
    assert len(started_by) == 2  # both processes took jobs
    assert simulator.counters()["requests_total"] == 13
    assert Attempt.objects.count() == 13
    # 10 failed first calls, 3 retries granted (they failed too); every job waits for room.
    parked = Job.objects.filter(status="waiting", wait_reason__startswith="retry budget")
    assert parked.count() == 10


def test_a_job_popped_from_the_budget_wait_list_while_it_parks_wakes_itself(
    redis_conn, workload, user, simulator, run_worker, settings, monkeypatch
):
    """A retry elsewhere succeeds between this job's refusal and its park: the refund pops it
    while it still reads 'running', so it is not resumed there; it must resume itself rather
    than wait for its fallback wake-up."""
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 1
    settings.AIQUEUE_RETRY_BUDGET_WAIT = 600
    workload.provider.retry_budget_ratio = 0
    workload.provider.save()
    provider = workload.provider
    in_flight = retry_budget.acquire(provider, is_retry=True)  # holds the only place
    job = submit(workload, user)
    Attempt.objects.create(
        job=job, number=1, provider=provider, model="sim-small",
        started_at=timezone.now() - timedelta(minutes=1), error_class="http_503",
        is_billed=False,
    )  # fmt: skip
    Job.objects.filter(pk=job.pk).update(attempt_count=1)
    park = services.do_park_job
    popped = []

    def refund_first(*args, **kwargs):
        # The other retry's success lands now, before this park is written.
        popped.extend(retries.wake_budget_waiters(
            provider, retry_budget.refund(provider, in_flight.member)
        ) for _ in [0])  # fmt: skip
        return park(*args, **kwargs)

    monkeypatch.setattr(services, "do_park_job", refund_first)
    run_worker()
    assert popped == [0]  # popped, but not resumed by the refund: the job was running
    job.refresh_from_db()
    # Back in the queue at once (the same burst ran it), not at its fallback 5-15 min later.
    assert job.status == "succeeded"
    reasons = list(job.events.values_list("reason", flat=True))
    assert f"retry budget of {provider.name} has room" in reasons


@pytest.mark.parametrize(
    ("error_class", "ended_before_deadline_s", "reason"),
    [
        ("timeout", 0, "deadline passed while running"),  # its read timeout was the deadline
        ("cut_off", -1, "deadline passed while running"),  # cut after it, by the heartbeat
        ("timeout", 10, "deadline passed while {provider} was failing"),  # the provider's own
        ("server_error", 0, "deadline passed while {provider} was failing"),
    ],
)
def test_an_expiry_blames_the_provider_only_for_a_failure_the_deadline_did_not_cause(
    workload, user, error_class, ended_before_deadline_s, reason
):
    job = submit(workload, user)
    deadline = timezone.now()
    Job.objects.filter(pk=job.pk).update(deadline=deadline, attempt_count=1)
    Attempt.objects.create(
        job=job, number=1, provider=workload.provider, model="m", started_at=deadline,
        ended_at=deadline - timedelta(seconds=ended_before_deadline_s), error_class=error_class,
        error_message="read timed out",
    )  # fmt: skip
    job.refresh_from_db()
    expiry = retries.expiry_for(job)
    assert expiry.reason == reason.format(provider=workload.provider.name)
