"""The circuit breaker per provider (jobs.flow.breaker): shared state in the suite's Redis, real
worker code, the simulator over real HTTP, and the admin page that shows and resets it."""

from __future__ import annotations

import django_rq
import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User

from jobs.flow import breaker
from jobs.models import Job, ModelPrice, Provider
from tests.jobs.test_retries import ENDED, run_scheduled_now, statuses, submit

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fast_backoff(settings):
    settings.AIQUEUE_RETRY_BACKOFF_BASE_MS = 5


@pytest.fixture
def touchy(workload):
    """The workload's provider opens its breaker after 2 consecutive failures."""
    provider = workload.provider
    provider.breaker_failure_threshold = 2
    provider.breaker_cooldown_s = 30
    provider.save()
    return provider


def open_breaker(provider: Provider) -> None:
    for _ in range(provider.breaker_failure_threshold):
        breaker.record(provider, ok=False, was_probe=False, reason="503: test")
    assert breaker.status(provider).state == breaker.OPEN


def make_probe_due(provider: Provider) -> None:
    """Skip the rest of the cooldown (30 s) by moving the probe time to now: no sleeping,
    and no race with a slow machine letting the cooldown pass too early."""
    key = breaker.KEY.format(provider=provider.pk)
    connection = django_rq.get_connection("default")
    seconds, micros = connection.time()
    connection.hset(key, "probe_at", seconds * 1000 + micros // 1000)


def test_breaker_opens_after_consecutive_5xx_and_parks_jobs_without_calling(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    workload.max_attempts = 3
    workload.save()
    simulator.control(script=[503, 503])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert breaker.status(touchy).state == breaker.OPEN
    assert statuses(job) == [503, 503]  # the third attempt was not made
    assert job.status == "waiting"
    assert job.wait_reason.startswith(f"circuit breaker open for {touchy.name}; retrying at")
    assert job.resume_at >= breaker.status(touchy).probe_at

    other = submit(workload, user, "another meeting")
    run_worker()
    other.refresh_from_db()
    assert other.status == "waiting"
    assert not other.attempts.exists()
    assert simulator.counters()["requests_total"] == 2


def test_permanent_errors_do_not_open_the_breaker(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    simulator.control(script=[400, 422, 404])
    jobs = [submit(workload, user, f"text {i}") for i in range(3)]
    run_worker()
    assert breaker.status(touchy).state == breaker.CLOSED
    assert all(Job.objects.get(pk=j.pk).status in ENDED for j in jobs)


def test_half_open_probe_success_closes_the_breaker_and_wakes_waiting_jobs(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    simulator.control(script=[503, 503])
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    other = submit(workload, user, "parked behind the open breaker")
    run_worker()
    other.refresh_from_db()
    assert other.status == "waiting"

    make_probe_due(touchy)
    run_scheduled_now(job, run_worker)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert statuses(job) == [503, 503, 200]
    # The probe's success woke the job waiting on the breaker, before its own resume time.
    other.refresh_from_db()
    assert other.status == "succeeded"
    reasons = list(other.events.values_list("reason", flat=True))
    assert f"circuit breaker for {touchy.name} closed" in reasons
    status = breaker.status(touchy)
    assert status.state == breaker.CLOSED
    transitions = [(e["from"], e["to"]) for e in reversed(status.history)]
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_probe_reopens_the_breaker_for_another_cooldown(redis_conn, touchy):
    open_breaker(touchy)
    first_probe_at = breaker.status(touchy).probe_at
    make_probe_due(touchy)
    permit = breaker.acquire(touchy)
    assert permit.is_probe
    breaker.record(touchy, ok=False, was_probe=True, reason="503: still down")
    status = breaker.status(touchy)
    assert status.state == breaker.OPEN
    assert status.probe_at > first_probe_at
    assert status.history[0]["reason"] == "probe failed: 503: still down"


def test_only_one_half_open_probe_at_a_time(redis_conn, touchy):
    open_breaker(touchy)
    assert breaker.acquire(touchy).verdict == "open"  # cooldown not over
    make_probe_due(touchy)
    assert breaker.acquire(touchy).is_probe
    second = breaker.acquire(touchy)
    assert second.verdict == "busy"
    assert not second.allowed
    # A probe that made no call hands the probe on at once.
    breaker.release(touchy, was_probe=True)
    assert breaker.acquire(touchy).is_probe


def test_fallback_provider_is_used_while_the_primary_breaker_is_open(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    fallback = Provider.objects.create(
        name="Fallback (Anthropic API)",
        kind=Provider.Kind.ANTHROPIC,
        base_url=f"{simulator.url}/v1",
    )
    ModelPrice.objects.create(
        provider=fallback, model="claude-3-5-haiku-latest", input_per_mtok=3, output_per_mtok=15
    )
    workload.fallback_provider = fallback
    workload.fallback_model = "claude-3-5-haiku-latest"
    workload.save()
    open_breaker(touchy)
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    attempt = job.attempts.get()
    assert (attempt.provider, attempt.model) == (fallback, "claude-3-5-haiku-latest")
    assert attempt.cost > 0


def test_open_fallback_is_not_used_and_the_job_waits(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    fallback = Provider.objects.create(
        name="Fallback", kind=Provider.Kind.SIMULATED, base_url=f"{simulator.url}/v1",
        breaker_failure_threshold=1,
    )  # fmt: skip
    workload.fallback_provider = fallback
    workload.save()
    open_breaker(touchy)
    open_breaker(fallback)
    job = submit(workload, user)
    run_worker()
    job.refresh_from_db()
    assert job.status == "waiting"
    assert simulator.counters()["requests_total"] == 0


def test_admin_shows_breaker_history_and_an_audited_reset(redis_conn, touchy, client):
    admin_user = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    open_breaker(touchy)
    client.force_login(admin_user)
    url = f"/admin/jobs/provider/{touchy.pk}/change/"
    page = client.get(url).content.decode()
    assert "Circuit breaker" in page
    assert "2 consecutive failures; last: 503: test" in page
    assert "Reset circuit breaker" in page

    response = client.post(f"/admin/jobs/provider/{touchy.pk}/reset-breaker/")
    assert response.status_code == 302
    assert breaker.status(touchy).state == breaker.CLOSED
    assert breaker.status(touchy).history[0]["reason"] == "reset by root"
    entry = LogEntry.objects.get(object_id=str(touchy.pk))
    assert "Reset the circuit breaker (was open)" in entry.get_change_message()


def test_breaker_reset_needs_post_and_the_change_permission(redis_conn, touchy, client, user):
    open_breaker(touchy)
    staff = User.objects.create_user("viewer", "v@example.com", "pw-viewer-123", is_staff=True)
    client.force_login(staff)
    url = f"/admin/jobs/provider/{touchy.pk}/reset-breaker/"
    assert client.post(url).status_code == 403
    admin_user = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin_user)
    assert client.get(url).status_code == 405
    assert breaker.status(touchy).state == breaker.OPEN
