"""The one retry layer (jobs.retries) end to end: the suite's Redis, the real worker code, the
simulator over real HTTP, and for the retry budget two real worker processes."""

from __future__ import annotations

import sys
from datetime import timedelta
from decimal import Decimal

import django_rq
import pytest
from django.utils import timezone
from rq import Worker as RQWorker

from jobs import retries, services
from jobs.flow import retry_budget
from jobs.models import Attempt, Job
from jobs.providers.base import structured_confidence
from tests.conftest import spawn
from tests.jobs.test_pipeline import wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)

ENDED = {"failed", "needs_review"}  # a final failure fails the job or escalates it to review


@pytest.fixture(autouse=True)
def fast_backoff(settings):
    # Backoff of a few ms: the tests see which waits come from the provider (Retry-After).
    settings.AIQUEUE_RETRY_BACKOFF_BASE_MS = 5
    settings.AIQUEUE_MAX_INLINE_RETRY_WAIT = 5


def submit(workload, user, text="The quarterly meeting covered hiring and budget.") -> Job:
    return services.do_submit_job(workload=workload, input_text=text, user=user)[0]


def run_scheduled_now(job: Job, run_worker) -> None:
    """Do what RQ's scheduler does at the job's resume time, without waiting for it."""
    queue = django_rq.get_queue(job.priority)
    assert job.rq_job_id in queue.scheduled_job_registry.get_job_ids()
    Job.objects.filter(pk=job.pk).update(resume_at=timezone.now())
    queue.enqueue_job(queue.fetch_job(job.rq_job_id))
    run_worker()


def statuses(job: Job) -> list[int | None]:
    return list(job.attempts.order_by("number").values_list("http_status", flat=True))


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


def test_5xx_is_retried_up_to_max_attempts_then_ends_with_the_error(
    redis_conn, workload, user, simulator, run_worker
):
    workload.max_attempts = 3
    workload.save()
    simulator.control(script=[503, 503, 503, 503])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status in ENDED
    assert statuses(job) == [503, 503, 503]
    assert simulator.counters()["requests_total"] == 3
    assert job.error_class == "http_503"
    assert job.error.startswith("gave up after 3 attempts: 503")


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
    assert statuses(job) == [400]
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
    assert statuses(job) == [429]
    # The wake-up survived the cleanup of the RQ entry that was running the job.
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert list(job.attempts.values_list("number", flat=True)) == [1, 2]
    assert statuses(job) == [429, 200]


def test_max_attempts_counts_across_a_park_and_resume(
    redis_conn, workload, user, simulator, run_worker
):
    workload.max_attempts = 2
    workload.save()
    simulator.control(script=[{"status": 429, "retry_after": 30}, 503, 503])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status in ENDED
    assert statuses(job) == [429, 503]
    assert job.error.startswith("gave up after 2 attempts")


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
    monkeypatch.delenv("AIQUEUE_TEST_UNSET_KEY", raising=False)
    workload.provider.api_key_env = "AIQUEUE_TEST_UNSET_KEY"
    workload.provider.save()
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status in ENDED
    assert job.error_class == "configuration"
    assert "AIQUEUE_TEST_UNSET_KEY is not set" in job.error
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
    assert statuses(job) == [503, 503]  # the first call and the one retry the floor allows
    assert retry_budget.usage(workload.provider) == {"calls": 2, "retries": 1}


def test_naive_policy_retries_each_call_three_times_without_budget(
    redis_conn, workload, user, simulator, run_worker, settings
):
    settings.AIQUEUE_RETRY_POLICY = "naive"
    settings.AIQUEUE_RETRY_BUDGET_FLOOR = 0
    simulator.control(script=[503, 503, 503, 200])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert statuses(job) == [503, 503, 503, 200]


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


def test_retry_budget_caps_retries_across_two_worker_processes(
    redis_conn, workload, user, simulator, tmp_path
):
    """Ten jobs whose first calls all fail, run by two worker processes: the retry budget (a
    floor of 3 retries a minute, no ratio) lets exactly 3 retries through in total."""
    workload.provider.retry_budget_ratio = 0
    workload.provider.breaker_failure_threshold = 100
    workload.provider.save()
    workload.max_attempts = 5
    workload.save()
    simulator.control(latency_ms=150, script=[503] * 10)
    env = {
        **worker_env(heartbeat=1, stale_after=30),
        "AIQUEUE_RETRY_BUDGET_FLOOR": "3",
        "AIQUEUE_RETRY_BUDGET_WAIT": "600",
        "AIQUEUE_RETRY_BACKOFF_BASE_MS": "5",
    }
    args = [sys.executable, "manage.py", "worker", "--no-scheduler"]
    workers = [spawn(args, tmp_path, env), spawn(args, tmp_path, env)]
    try:
        wait_for(lambda: len(RQWorker.all(connection=redis_conn)) == 2, timeout=90)
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
    parked = Job.objects.filter(status="waiting", wait_reason__startswith="retry budget")
    assert parked.count() == 7  # 10 failed calls, 3 retries granted
    assert Job.objects.filter(status__in=["succeeded", "waiting"]).count() == 10
