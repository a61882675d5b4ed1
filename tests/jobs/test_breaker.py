"""The circuit breaker per provider (jobs.flow.breaker): shared state in the suite's Redis, real
worker code, the simulator over real HTTP, and the admin page that shows and resets it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User

from jobs.flow import breaker
from jobs.models import Job, ModelPrice, Provider
from tests.factories import submit
from tests.helpers import ENDED, http_statuses, make_probe_due, run_scheduled_now

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_backoff(settings):
    settings.AIQUEUE_RETRY_BACKOFF_BASE_MS = 5


@pytest.fixture
def by_rate(workload):
    """The workload's provider opens its breaker at a 50 % failure rate over at least 10 of
    its last 20 calls (the consecutive rule out of the way)."""
    provider = workload.provider
    provider.breaker_failure_threshold = 100
    provider.breaker_failure_rate = 0.5
    provider.breaker_min_calls = 10
    provider.breaker_window_calls = 20
    provider.breaker_window_s = 60
    provider.save()
    return provider


def record(provider: Provider, outcomes: list[bool], *, probe: bool = False) -> str:
    state = breaker.CLOSED
    for ok in outcomes:
        state = breaker.record(provider, ok=ok, was_probe=probe, reason="503: test")
    return state


def open_breaker(provider: Provider) -> None:
    for _ in range(provider.breaker_failure_threshold):
        breaker.record(provider, ok=False, was_probe=False, reason="503: test")
    assert breaker.status(provider).state == breaker.OPEN


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
    assert http_statuses(job) == [503, 503]  # the third attempt was not made
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
    assert http_statuses(job) == [503, 503, 200]
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


def test_failure_rate_opens_the_breaker_at_its_threshold_once_it_has_enough_calls(
    redis_conn, by_rate
):
    # Half of 8 calls failed: below the minimum number of calls, no verdict.
    assert record(by_rate, [True, False] * 4) == breaker.CLOSED
    # 4 of 10 failed: 40 %, under the threshold.
    assert record(by_rate, [True, True]) == breaker.CLOSED
    # 5 of 11 is still under it; the failure that makes it 50 % (6 of 12) opens it.
    assert record(by_rate, [False]) == breaker.CLOSED
    assert record(by_rate, [False]) == breaker.OPEN
    status = breaker.status(by_rate)
    assert status.history[0]["reason"] == "6 of the last 12 calls failed (50 %); last: 503: test"
    assert (status.window_calls, status.window_failures, status.failure_rate) == (12, 6, 0.5)


def test_the_failure_rate_window_holds_only_the_last_calls(redis_conn, by_rate):
    # Ten failures long ago (in calls), then twenty successes: the window forgot them.
    by_rate.breaker_min_calls = 5
    by_rate.save()
    record(by_rate, [False, True] * 2 + [True] * 20)
    assert record(by_rate, [False]) == breaker.CLOSED
    status = breaker.status(by_rate)
    assert (status.window_calls, status.window_failures) == (20, 1)


def test_a_half_failing_provider_opens_the_breaker_and_later_jobs_wait_without_calling(
    redis_conn, workload, by_rate, user, simulator, run_worker
):
    """Every other call fails: never five in a row, so only the failure rate can see it."""
    simulator.control(script=[503, 200] * 12)
    jobs = [submit(workload, user, f"meeting {i}") for i in range(8)]
    run_worker()
    assert breaker.status(by_rate).state == breaker.OPEN
    # Five jobs made a failed call and a retry that succeeded (10 calls, 50 %: not a verdict
    # until a failure); the sixth's failed call opened the breaker.
    assert simulator.counters()["requests_total"] == 11
    waiting = [j for j in jobs if Job.objects.get(pk=j.pk).status == "waiting"]
    assert len(waiting) == 3
    assert sum(Job.objects.get(pk=j.pk).attempts.count() for j in waiting) == 1


def test_only_the_first_jobs_turned_away_come_back_at_the_probe_time(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    """The rest wait to be woken by the probes: in a long outage, waking every waiting job at
    every probe time would only turn them away again."""
    open_breaker(touchy)
    jobs = [submit(workload, user, f"parked {i}") for i in range(4)]
    run_worker()
    probe_at = breaker.status(touchy).probe_at
    resume = [Job.objects.get(pk=j.pk).resume_at for j in jobs]
    assert all(probe_at < at <= probe_at + timedelta(seconds=2) for at in resume[:2])
    assert all(at >= probe_at + timedelta(seconds=30) for at in resume[2:])
    assert breaker.acquire(touchy).turned_away == 5


def test_half_open_lets_one_probe_at_a_time_and_closes_after_several_successes(redis_conn, touchy):
    touchy.breaker_probe_successes = 3
    touchy.save()
    open_breaker(touchy)
    make_probe_due(touchy)
    for expected in (breaker.HALF_OPEN, breaker.HALF_OPEN, breaker.CLOSED):
        assert breaker.acquire(touchy).is_probe
        assert breaker.acquire(touchy).verdict == "busy"  # one at a time
        assert record(touchy, [True], probe=True) == expected
    history = breaker.status(touchy).history
    assert history[0]["reason"] == "3 probes in a row succeeded"


def test_a_probe_that_fails_after_a_lucky_one_opens_the_breaker_again(redis_conn, touchy):
    """A provider answering half of its calls must not flap the breaker closed."""
    touchy.breaker_probe_successes = 3
    touchy.save()
    open_breaker(touchy)
    make_probe_due(touchy)
    assert breaker.acquire(touchy).is_probe
    assert record(touchy, [True], probe=True) == breaker.HALF_OPEN
    assert breaker.acquire(touchy).is_probe
    assert record(touchy, [False], probe=True) == breaker.OPEN
    # No probe before the next open time is over.
    status = breaker.status(touchy)
    assert breaker.acquire(touchy).verdict == "open"
    assert (status.probe_at - status.opened_at).total_seconds() == touchy.breaker_cooldown_s


@pytest.mark.parametrize(("retry_after", "open_s"), [(45, 45), (7, 30), (None, 30), (900, 300)])
def test_a_longer_retry_after_keeps_the_breaker_open_longer(
    redis_conn, touchy, retry_after, open_s
):
    """The provider's hint may lengthen the cooldown (30 s here, to ten of them at most), never
    shorten it."""
    breaker.record(touchy, ok=False, was_probe=False, reason="503: down")
    breaker.record(touchy, ok=False, was_probe=False, reason="503: down", retry_after=retry_after)
    status = breaker.status(touchy)
    assert status.state == breaker.OPEN
    assert (status.probe_at - status.opened_at).total_seconds() == open_s


def test_each_successful_probe_wakes_the_next_and_the_last_wakes_everyone(
    redis_conn, workload, touchy, user, simulator, run_worker
):
    touchy.breaker_probe_successes = 2
    touchy.save()
    open_breaker(touchy)
    jobs = [submit(workload, user, f"parked {i}") for i in range(3)]
    run_worker()
    assert [Job.objects.get(pk=j.pk).status for j in jobs] == ["waiting"] * 3
    make_probe_due(touchy)
    run_scheduled_now(Job.objects.get(pk=jobs[0].pk), run_worker)
    assert [Job.objects.get(pk=j.pk).status for j in jobs] == ["succeeded"] * 3
    assert simulator.counters()["requests_total"] == 3
    assert breaker.status(touchy).history[0]["reason"] == "2 probes in a row succeeded"
    reasons = {j.pk: set(j.events.values_list("reason", flat=True)) for j in jobs}
    assert f"circuit breaker for {touchy.name}: next probe" in reasons[jobs[1].pk]
    assert f"circuit breaker for {touchy.name} closed" in reasons[jobs[2].pk]


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


def test_admin_edits_the_breaker_settings_and_shows_its_failure_rate(redis_conn, by_rate, client):
    admin_user = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    record(by_rate, [False, True, True, True])
    client.force_login(admin_user)
    url = f"/admin/jobs/provider/{by_rate.pk}/change/"
    page = client.get(url).content.decode()
    assert "failure rate 25% of the last 4 calls (opens at 50% from 10 calls)" in page
    form = {
        "name": by_rate.name, "kind": by_rate.kind, "base_url": by_rate.base_url,
        "connect_timeout_s": 5, "read_timeout_s": 30, "retry_budget_ratio": 0.1,
        "breaker_failure_threshold": 5, "breaker_failure_rate": 0.3, "breaker_window_calls": 40,
        "breaker_window_s": 30, "breaker_min_calls": 20, "breaker_cooldown_s": 15,
        "breaker_probe_successes": 4, "is_active": "on",
        "max_tokens_field": by_rate.max_tokens_field,
        "anthropic_version": by_rate.anthropic_version,
        "prices-TOTAL_FORMS": 0, "prices-INITIAL_FORMS": 0,
    }  # fmt: skip
    assert client.post(url, form).status_code == 302
    by_rate.refresh_from_db()
    assert (by_rate.breaker_failure_rate, by_rate.breaker_window_calls) == (0.3, 40)
    assert (by_rate.breaker_min_calls, by_rate.breaker_probe_successes) == (20, 4)
    # A minimum the window can never hold is refused.
    page = client.post(url, {**form, "breaker_min_calls": 50}).content.decode()
    assert "Cannot be more than the window&#x27;s number of calls." in page


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
