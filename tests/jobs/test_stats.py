"""Each dashboard figure from known ledger and audit data, with exact numbers."""

from __future__ import annotations

import datetime as dt
import importlib
from decimal import Decimal

import pytest
from django.apps import apps as django_apps

from jobs import timeline
from jobs.flow import breaker, leases
from jobs.models import Attempt, Budget, Job, JobEvent, Priority, Provider, Workload
from ops import stats
from review.models import ReviewItem
from tests import factories

NOW = dt.datetime(2025, 3, 15, 12, 0, 30, tzinfo=dt.UTC)


def ago(**kwargs) -> dt.datetime:
    return NOW - dt.timedelta(**kwargs)


@pytest.fixture
def sim(db) -> Provider:
    return Provider.objects.create(name="Sim", kind=Provider.Kind.SIMULATED)


@pytest.fixture
def notes(sim) -> Workload:
    return Workload.objects.create(name="Notes", provider=sim, model="m")


@pytest.fixture
def tags(sim) -> Workload:
    return Workload.objects.create(name="Tags", provider=sim, model="m")


def make_job(workload, status=Job.Status.QUEUED, priority=Priority.DEFAULT, **fields) -> Job:
    fields.setdefault("created_at", ago(hours=3))
    return factories.make_job(workload, status, priority=priority, **fields)


def attempt(job, number, started_at, cost="0", error_class="", latency_ms=100) -> Attempt:
    return Attempt.objects.create(
        job=job,
        number=number,
        provider=job.workload.provider,
        model="m",
        started_at=started_at,
        ended_at=started_at + dt.timedelta(milliseconds=latency_ms),
        error_class=error_class,
        cost=Decimal(cost),
        latency_ms=latency_ms,
    )


@pytest.fixture
def ledger(notes, tags):
    """A known mix of jobs, attempts and review items around NOW."""
    for _ in range(2):
        make_job(notes, priority=Priority.HIGH)
    make_job(notes, priority=Priority.LOW)
    make_job(tags, priority=Priority.DEFAULT)
    for reason, kind in [
        ("circuit breaker open for Sim; retrying at 12:01:00", Job.WaitKind.BREAKER),
        ("concurrency cap full (3/3) for Sim", Job.WaitKind.CAPACITY),
        ("concurrency cap full (3/3) for workload Notes", Job.WaitKind.CAPACITY),
        ("rate limit (rpm) reached; retrying in 2.0 s", Job.WaitKind.RATE_LIMIT),
        ("provider error (503); retrying at 12:00:40", Job.WaitKind.BACKOFF),
    ]:
        make_job(notes, Job.Status.WAITING, wait_reason=reason, wait_kind=kind)
    make_job(tags, Job.Status.WAITING, wait_reason="workload paused", wait_kind=Job.WaitKind.PAUSED)
    make_job(
        notes, Job.Status.HELD, wait_reason="budget 'b' exhausted", wait_kind=Job.WaitKind.BUDGET
    )
    # Running: started 2 h ago (outside the latency window).
    make_job(notes, Job.Status.RUNNING, queued_at=ago(hours=2, seconds=5), started_at=ago(hours=2))

    # Finished jobs of Notes: queue waits 1, 2, 3, 4, 10 s and run times 2, 4, 6, 8, 20 s; the
    # last three finish within the throughput window (10 min).
    finished = []
    for i, (wait, run, finished_ago) in enumerate(
        [(1, 2, 50), (2, 4, 30), (3, 6, 9), (4, 8, 5), (10, 20, 1)]
    ):
        finished_at = ago(minutes=finished_ago)
        started_at = finished_at - dt.timedelta(seconds=run)
        finished.append(
            make_job(
                notes,
                Job.Status.SUCCEEDED if i != 1 else Job.Status.FAILED,
                queued_at=started_at - dt.timedelta(seconds=wait),
                started_at=started_at,
                finished_at=finished_at,
            )
        )
    # A Tags job without queued_at: its wait counts from created_at (7 s).
    make_job(
        tags,
        Job.Status.SUCCEEDED,
        created_at=ago(minutes=20, seconds=7),
        started_at=ago(minutes=20),
        finished_at=ago(minutes=19),
    )

    # Attempts in the last hour (Notes): 4, one failed, one retry.
    attempt(finished[0], 1, ago(minutes=50), "0.01")
    attempt(finished[1], 1, ago(minutes=31), "0.02", error_class="server_error")
    attempt(finished[1], 2, ago(minutes=30), "0.03")
    attempt(finished[2], 1, ago(minutes=9), "0.04")
    # Today but outside the rate window; earlier this month; last month.
    attempt(finished[3], 1, ago(hours=2), "0.05", error_class="timeout")
    attempt(finished[3], 2, dt.datetime(2025, 3, 1, 0, 0, 1, tzinfo=dt.UTC), "1.00")
    attempt(finished[4], 1, dt.datetime(2025, 2, 28, 23, 0, tzinfo=dt.UTC), "5.00")

    ReviewItem.objects.create(job=finished[0], reason="low_confidence", created_at=ago(minutes=30))
    ReviewItem.objects.create(job=finished[1], reason="failed", created_at=ago(minutes=10))
    ReviewItem.objects.create(
        job=finished[2], reason="sampled", created_at=ago(hours=5), status="resolved"
    )


def figures():
    overall, per = stats.workload_figures(NOW)
    return overall, {fig.name: fig for fig in per}


def test_queued_jobs_are_counted_by_priority(ledger):
    overall, per = figures()
    assert overall.queued_by_priority == {"high": 2, "default": 1, "low": 1}
    assert per["Notes"].queued_by_priority == {"high": 2, "default": 0, "low": 1}
    assert per["Tags"].queued == 1


def test_waiting_jobs_are_split_by_reason(ledger):
    overall, per = figures()
    assert per["Notes"].waiting_by_reason == {
        "capacity": 2,
        "rate_limit": 1,
        "breaker": 1,
        "backoff": 1,
        "paused": 0,
        "other": 0,
    }
    assert per["Tags"].waiting_by_reason["paused"] == 1
    assert overall.waiting == 6


def test_held_and_running_are_counted(ledger):
    overall, per = figures()
    assert (overall.held, overall.running) == (1, 1)
    assert (per["Tags"].held, per["Tags"].running) == (0, 0)


def test_throughput_counts_jobs_finished_in_the_last_ten_minutes(ledger):
    overall, per = figures()
    assert per["Notes"].finished_recently == 3
    assert per["Notes"].throughput_per_min == pytest.approx(0.3)
    assert overall.throughput_per_min == pytest.approx(0.3)


def test_queue_wait_and_run_time_percentiles(ledger):
    overall, per = figures()
    notes = per["Notes"]
    assert (notes.queue_wait_p50, notes.queue_wait_p95) == (3.0, 10.0)
    assert (notes.run_time_p50, notes.run_time_p95) == (6.0, 20.0)
    # Tags' one job waited from created_at (no queued_at): 7 s; ran 60 s.
    assert per["Tags"].queue_waits == [7.0]
    assert per["Tags"].run_times == [60.0]
    # Overall waits 1, 2, 3, 4, 7, 10: nearest-rank p50 is the 3rd value.
    assert (overall.queue_wait_p50, overall.queue_wait_p95) == (3.0, 10.0)


def test_error_and_retry_rates_come_from_the_last_hour_of_attempts(ledger):
    overall, per = figures()
    notes = per["Notes"]
    assert (notes.attempts, notes.failed_attempts, notes.retries) == (4, 1, 1)
    assert notes.error_rate == 0.25
    assert notes.retry_rate == 0.25
    assert per["Tags"].error_rate is None


def test_spend_today_and_this_month_include_failed_calls(ledger):
    overall, per = figures()
    assert per["Notes"].spend_today == Decimal("0.15")
    assert per["Notes"].spend_month == Decimal("1.15")
    assert overall.spend_month == Decimal("1.15")


def test_review_backlog_counts_open_items_and_the_oldest_age(ledger):
    overall, per = figures()
    assert per["Notes"].review_open == 2
    assert per["Notes"].review_oldest_age == dt.timedelta(minutes=30)
    assert per["Tags"].review_open == 0
    assert per["Tags"].review_oldest_age is None


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("circuit breaker open for OpenAI; retrying at 10:00:01", "breaker"),
        ("rate limited by provider; retrying at 10:00:01", "rate_limit"),
        ("rate limit (tpm) reached; retrying in 3.0 s", "rate_limit"),
        ("concurrency cap full (5/5) for OpenAI", "capacity"),
        ("workload paused", "paused"),
        ("provider error (timeout); retrying at 10:00:01", "backoff"),
        (
            "retry budget of OpenAI exhausted (3 retries / 11 calls in the last 60 s)",
            "retry_budget",
        ),
        ("3 of 4 chunks still to finish", "chunks"),
        ("the run's time is up", "other"),
    ],
)
def test_jobs_waiting_before_the_kind_was_recorded_get_it_from_their_words(
    notes, sim, reason, kind
):
    migration = importlib.import_module("jobs.migrations.0014_i19_wait_kind")
    prefixed = Provider.objects.create(name=f"{sim.name} EU", kind=Provider.Kind.SIMULATED)
    job = make_job(notes, Job.Status.WAITING, wait_reason=reason)
    breaker_job = make_job(
        notes, Job.Status.WAITING, wait_reason=f"circuit breaker open for {prefixed.name}; retry"
    )
    held = make_job(notes, Job.Status.HELD, wait_reason="provider Sim is out of credit")
    migration.fill_wait_kind(django_apps, None)
    job.refresh_from_db()
    assert job.wait_kind == kind
    assert timeline.legacy_wait_kind(Job.Status.WAITING, reason) == kind  # old audit events
    breaker_job.refresh_from_db()
    # The longest matching name: "Sim EU" is not "Sim".
    assert (breaker_job.wait_kind, breaker_job.wait_on) == ("breaker", f"provider:{prefixed.pk}")
    held.refresh_from_db()
    assert held.wait_kind == "credit"


def test_percentile_is_nearest_rank():
    assert stats.percentile([5, 1, 3, 2, 4], 50) == 3
    assert stats.percentile(list(range(1, 101)), 95) == 95
    assert stats.percentile([], 95) is None


def test_bounded_samples_large_windows_evenly(notes):
    for _ in range(30):
        make_job(notes)
    sample = stats.bounded(Job.objects.all(), limit=10)
    assert sample.count() == 10
    assert stats.bounded(Job.objects.all(), limit=30).count() == 30


# --- providers and budgets -------------------------------------------------------------------


def test_in_flight_without_a_cap_counts_running_jobs(notes, redis_conn):
    make_job(notes, Job.Status.RUNNING)
    make_job(notes, Job.Status.RUNNING)
    [state] = stats.provider_states()
    assert (state.in_flight, state.cap, state.in_flight_source) == (2, None, "database")


def test_in_flight_with_a_cap_counts_live_leases(sim, notes, redis_conn):
    sim.max_concurrency = 3
    sim.save()
    notes.refresh_from_db()
    job = make_job(notes, Job.Status.RUNNING)
    for _ in range(2):
        assert isinstance(leases.acquire(job, leases.resources_for(notes)), leases.Lease)
    [state] = stats.provider_states()
    assert (state.in_flight, state.cap, state.in_flight_source) == (2, 3, "leases")


def test_breaker_state_is_read_from_redis(sim, redis_conn):
    assert stats.provider_states()[0].breaker == "closed"
    for _ in range(sim.breaker_failure_threshold):
        breaker.record(sim, ok=False, was_probe=False, reason="503")
    [state] = stats.provider_states()
    assert state.breaker == "open"
    assert state.breaker_detail["failures"] == sim.breaker_failure_threshold


def test_calls_per_job_and_retry_ratio_per_provider_come_from_the_last_hour(ledger, sim):
    # Sim's calls of the last hour: three jobs, one of which made a second call.
    [state] = stats.provider_states(NOW)
    assert (state.calls, state.jobs, state.retries) == (4, 3, 1)
    assert state.calls_per_job == pytest.approx(4 / 3)
    assert state.retry_ratio == 0.25


def test_breaker_failure_rate_is_shown_against_its_threshold(sim, redis_conn):
    for ok in [True, False, True, True]:
        breaker.record(sim, ok=ok, was_probe=False, reason="503")
    [state] = stats.provider_states()
    detail = state.breaker_detail
    assert (detail["failure_rate"], detail["window_calls"]) == (0.25, 4)
    assert (detail["threshold"], detail["min_calls"]) == (0.4, 10)


def test_breaker_state_is_unknown_when_redis_is_down(sim, settings):
    settings.RQ_QUEUES = {
        name: {"URL": "redis://127.0.0.1:1/0"} for name in settings.RQ_QUEUE_NAMES
    }
    assert stats.breaker_state(sim) == ("unknown", {})


def test_budgets_are_listed_with_their_usage(notes):
    Budget.objects.create(name="All", cap_usd=Decimal("10"), period=Budget.Period.MONTH)
    Budget.objects.create(name="Notes daily", workload=notes, cap_usd=Decimal("2"))
    Budget.objects.filter(name="Notes daily").update(spent_nanos=500_000_000)
    rows = stats.budget_rows()
    assert [b.name for b in rows] == ["All", "Notes daily"]
    assert rows[1].spent_usd == Decimal("0.5")
    assert rows[1].used_fraction == 0.25


# --- time series -------------------------------------------------------------------------------


def event(job, at, from_status, to_status):
    JobEvent.objects.create(job=job, created_at=at, from_status=from_status, to_status=to_status)


def test_queue_depth_is_reconstructed_from_the_audit_log(notes):
    x = make_job(notes, Job.Status.RUNNING)
    y = make_job(notes, Job.Status.QUEUED)
    z = make_job(notes, Job.Status.WAITING)
    event(x, NOW.replace(minute=50, second=0) - dt.timedelta(hours=1), "", "queued")  # 11:50:00
    event(x, dt.datetime(2025, 3, 15, 11, 55, 20, tzinfo=dt.UTC), "queued", "running")
    event(y, dt.datetime(2025, 3, 15, 11, 58, 0, tzinfo=dt.UTC), "", "queued")
    event(z, dt.datetime(2025, 3, 15, 11, 57, 0, tzinfo=dt.UTC), "", "queued")
    event(z, dt.datetime(2025, 3, 15, 11, 59, 30, tzinfo=dt.UTC), "queued", "waiting")

    hour = stats.series("hour", NOW)
    assert len(hour.starts) == 60
    assert hour.starts[-1] == dt.datetime(2025, 3, 15, 12, 0, tzinfo=dt.UTC)
    by_minute = dict(zip([s.strftime("%H:%M") for s in hour.starts], hour.queued, strict=True))
    assert by_minute["11:49"] == 0
    assert by_minute["11:50"] == 1
    assert by_minute["11:55"] == 0
    assert by_minute["11:57"] == 1
    assert by_minute["11:58"] == 2
    assert by_minute["11:59"] == 1
    assert by_minute["12:00"] == 1
    backlog = dict(zip([s.strftime("%H:%M") for s in hour.starts], hour.backlog, strict=True))
    assert (backlog["11:58"], backlog["11:59"], backlog["12:00"]) == (0, 1, 1)


def test_hourly_series_bucket_throughput_latency_and_spend(notes):
    a = make_job(
        notes,
        Job.Status.SUCCEEDED,
        queued_at=dt.datetime(2025, 3, 15, 11, 58, 0, tzinfo=dt.UTC),
        started_at=dt.datetime(2025, 3, 15, 11, 58, 4, tzinfo=dt.UTC),
        finished_at=dt.datetime(2025, 3, 15, 11, 58, 10, tzinfo=dt.UTC),
    )
    make_job(
        notes,
        Job.Status.SUCCEEDED,
        queued_at=dt.datetime(2025, 3, 15, 11, 58, 0, tzinfo=dt.UTC),
        started_at=dt.datetime(2025, 3, 15, 11, 58, 2, tzinfo=dt.UTC),
        finished_at=dt.datetime(2025, 3, 15, 11, 58, 50, tzinfo=dt.UTC),
    )
    attempt(a, 1, dt.datetime(2025, 3, 15, 11, 58, 5, tzinfo=dt.UTC), "0.25")
    attempt(a, 2, dt.datetime(2025, 3, 15, 11, 58, 6, tzinfo=dt.UTC), "0.50")
    attempt(a, 3, dt.datetime(2025, 3, 15, 10, 58, 6, tzinfo=dt.UTC), "9.00")  # an hour earlier

    hour = stats.series("hour", NOW)
    i = [s.strftime("%H:%M") for s in hour.starts].index("11:58")
    assert hour.throughput[i] == 2
    assert sum(hour.throughput) == 2
    assert hour.run_time_p95[i] == 48.0
    assert hour.queue_wait_p95[i] == 4.0
    assert hour.spend[i] == Decimal("0.75")
    assert sum(hour.spend) == Decimal("0.75")

    day = stats.series("day", NOW)
    assert len(day.starts) == 24
    assert day.starts[-1] == dt.datetime(2025, 3, 15, 12, 0, tzinfo=dt.UTC)
    assert day.throughput[-2] == pytest.approx(2 / 60)
    assert (day.spend[-3], day.spend[-2], day.spend[-1]) == (
        Decimal("9.00"),
        Decimal("0.75"),
        Decimal("0"),
    )
