"""/metrics: Prometheus text computed from the ledger and Redis, parsed with the official client
parser; staff or a bearer token only."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs.flow import breaker
from jobs.models import Attempt, Job, Priority, Provider, Workload

TOKEN = "metrics-secret-123"


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("sam", password="pw-sam-12345", is_staff=True)


@pytest.fixture
def data(db, redis_conn):
    sim = Provider.objects.create(name="Sim", kind=Provider.Kind.SIMULATED, max_concurrency=4)
    notes = Workload.objects.create(name="Notes", provider=sim, model="m")
    now = timezone.now()

    def job(status, priority=Priority.DEFAULT, **fields):
        return Job.objects.create(
            workload=notes, input_text="x", status=status, priority=priority, **fields
        )

    job(Job.Status.QUEUED, Priority.HIGH)
    job(Job.Status.QUEUED, Priority.LOW)
    job(
        Job.Status.WAITING,
        wait_reason="circuit breaker open for Sim; retrying at 12:00",
        wait_kind=Job.WaitKind.BREAKER,
    )
    done = job(
        Job.Status.SUCCEEDED,
        queued_at=now - dt.timedelta(seconds=3),
        started_at=now - dt.timedelta(seconds=2),
        finished_at=now,
    )
    for number, (latency, error, cost) in enumerate(
        [(200, "server_error", "0.10"), (700, "", "0.25"), (3000, "", "0.05")], start=1
    ):
        Attempt.objects.create(
            job=done,
            number=number,
            provider=sim,
            model="m",
            started_at=now,
            latency_ms=latency,
            error_class=error,
            cost=Decimal(cost),
        )
    for _ in range(sim.breaker_failure_threshold):
        breaker.record(sim, ok=False, was_probe=False, reason="503")
    return sim


def scrape(client, **headers) -> dict:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    families = text_string_to_metric_families(response.content.decode())
    return {family.name: family for family in families}


def value(families, name, sample=None, **labels) -> float:
    family = families[name]
    for s in family.samples:
        if (sample is None or s.name == sample) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return s.value
    raise AssertionError(f"no sample {sample or name} {labels}")


def test_metrics_report_jobs_queues_attempts_spend_and_breakers(client, staff, data):
    client.force_login(staff)
    families = scrape(client)

    assert value(families, "aiqueue_jobs", workload="Notes", status="queued") == 2
    assert value(families, "aiqueue_jobs", workload="Notes", status="succeeded") == 1
    assert value(families, "aiqueue_jobs", workload="Notes", status="failed") == 0
    assert value(families, "aiqueue_queue_depth", workload="Notes", priority="high") == 1
    assert value(families, "aiqueue_queue_depth", workload="Notes", priority="default") == 0
    assert value(families, "aiqueue_waiting_jobs", workload="Notes", reason="breaker") == 1

    assert value(families, "aiqueue_attempts", provider="Sim", outcome="ok") == 2
    assert value(families, "aiqueue_attempts", provider="Sim", outcome="server_error") == 1
    assert families["aiqueue_attempts"].type == "counter"
    assert value(families, "aiqueue_spend_usd", provider="Sim") == pytest.approx(0.40)

    latency = "aiqueue_attempt_latency_seconds"
    assert families[latency].type == "histogram"
    assert value(families, latency, f"{latency}_bucket", provider="Sim", le="0.25") == 1
    assert value(families, latency, f"{latency}_bucket", provider="Sim", le="1.0") == 2
    assert value(families, latency, f"{latency}_bucket", provider="Sim", le="5.0") == 3
    assert value(families, latency, f"{latency}_bucket", provider="Sim", le="+Inf") == 3
    assert value(families, latency, f"{latency}_count", provider="Sim") == 3
    assert value(families, latency, f"{latency}_sum", provider="Sim") == pytest.approx(3.9)

    run = "aiqueue_job_run_seconds"
    assert value(families, run, f"{run}_bucket", workload="Notes", le="1.0") == 0
    assert value(families, run, f"{run}_bucket", workload="Notes", le="2.5") == 1
    assert value(families, run, f"{run}_sum", workload="Notes") == pytest.approx(2.0)
    wait = "aiqueue_job_queue_wait_seconds"
    assert value(families, wait, f"{wait}_bucket", workload="Notes", le="0.5") == 0
    assert value(families, wait, f"{wait}_bucket", workload="Notes", le="1.0") == 1

    assert value(families, "aiqueue_provider_concurrency_cap", provider="Sim") == 4
    assert value(families, "aiqueue_provider_in_flight", provider="Sim") == 0
    assert value(families, "aiqueue_breaker_state", provider="Sim", state="open") == 1
    assert value(families, "aiqueue_breaker_state", provider="Sim", state="closed") == 0
    assert value(families, "aiqueue_rq_queue_length", queue="high") == 0
    assert value(families, "aiqueue_review_open") == 0


def test_metrics_accept_the_configured_bearer_token(client, data, settings):
    settings.AIQUEUE_METRICS_TOKEN = TOKEN
    families = scrape(client, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert "aiqueue_jobs" in families


@pytest.mark.parametrize(
    ("configured", "header"),
    [
        (TOKEN, ""),
        (TOKEN, "Bearer wrong-token"),
        (TOKEN, f"Basic {TOKEN}"),
        ("", "Bearer "),  # no token configured: bearer access is off
    ],
)
def test_metrics_refuse_anonymous_callers(client, db, settings, configured, header):
    settings.AIQUEUE_METRICS_TOKEN = configured
    response = client.get("/metrics", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_metrics_refuse_logged_in_non_staff(client, user):
    client.force_login(user)
    assert client.get("/metrics").status_code == 403
