"""Spend per workload, model, submitter and API token (ops.spend) and its page."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs.models import ApiToken, Attempt, Job
from ops import spend
from tests.factories import make_job, make_token, make_user, make_workload

# A fixed instant in the configured time zone: "today" and "this month" do not depend on when
# the suite runs (at 00:00:30 an attempt a minute old would be yesterday's).
NOW = timezone.make_aware(dt.datetime(2026, 6, 15, 12, 0))


def charge(job: Job, cost: str, started_at: dt.datetime, *, model: str = "sim-small", tokens=10):
    number = job.attempts.count() + 1
    return Attempt.objects.create(
        job=job,
        number=number,
        provider=job.workload.provider,
        model=model,
        started_at=started_at,
        cost=Decimal(cost),
        tokens_in=tokens,
        tokens_out=tokens,
    )


def by_label(table: spend.Table) -> dict[str, spend.Row]:
    return {row.label: row for row in table.rows}


def test_spend_is_summed_per_workload_model_submitter_and_token(workload, provider, user):
    other_workload = make_workload(provider, name="Triage", model="sim-large")
    bob = make_user("bob")
    key = make_token(user, name="nightly")
    token = ApiToken.objects.get(name="nightly")
    assert key  # its key is the owner's only

    by_token = make_job(workload, submitted_by=user, api_token=token)
    by_page = make_job(workload, submitted_by=user)
    by_bob = make_job(other_workload, submitted_by=bob)
    charge(by_token, "0.10", NOW - dt.timedelta(hours=1))  # today
    charge(by_token, "0.20", NOW - dt.timedelta(days=10))  # this month, not today
    charge(by_token, "5.00", NOW - dt.timedelta(days=20))  # last month: not counted
    charge(by_page, "0.01", NOW - dt.timedelta(minutes=5))  # a failed call is paid too
    charge(by_bob, "0.40", NOW - dt.timedelta(days=3), model="sim-large", tokens=100)
    charge(by_bob, "9.00", NOW + dt.timedelta(hours=1))  # after `now`: not yet

    tables = {table.slug: table for table in spend.tables(NOW)}
    assert list(tables) == ["workload", "model", "user", "token"]

    workloads = by_label(tables["workload"])
    assert workloads[workload.name].today == Decimal("0.11")
    assert workloads[workload.name].month == Decimal("0.31")
    assert (workloads[workload.name].calls_today, workloads[workload.name].calls_month) == (2, 3)
    assert workloads["Triage"].month == Decimal("0.40")
    assert workloads["Triage"].today == 0
    assert workloads["Triage"].tokens_month == 200
    # The month's biggest spender first.
    assert [row.label for row in tables["workload"].rows] == ["Triage", workload.name]
    assert tables["workload"].month_total == Decimal("0.71")

    models = by_label(tables["model"])
    assert models["sim-small"].month == Decimal("0.31")
    assert models["sim-large"].month == Decimal("0.40")
    assert models["sim-large"].detail == provider.name

    users = by_label(tables["user"])
    assert users["alice"].month == Decimal("0.31")
    assert users["bob"].month == Decimal("0.40")

    tokens = by_label(tables["token"])
    assert tokens[str(token)].month == Decimal("0.30")
    assert tokens[str(token)].today == Decimal("0.10")
    assert tokens[str(token)].detail == "of alice"
    assert tokens["No token"].month == Decimal("0.41")  # the page's job and bob's
    # Every table sums the same ledger.
    assert {table.month_total for table in tables.values()} == {Decimal("0.71")}


def test_a_deleted_tokens_spend_stays_counted_without_it(workload, user):
    make_token(user, name="old")
    token = ApiToken.objects.get(name="old")
    job = make_job(workload, submitted_by=user, api_token=token)
    charge(job, "0.05", NOW - dt.timedelta(hours=2))
    token.delete()
    job.refresh_from_db()
    assert job.api_token is None
    tokens = by_label(spend.tables(NOW)[3])
    assert tokens["No token"].month == Decimal("0.05")


@pytest.mark.django_db
def test_no_calls_shows_an_empty_state_per_table(client, operator):
    client.force_login(operator)
    response = client.get(reverse("spend"))
    assert response.status_code == 200
    assert response.content.decode().count("No provider calls this month.") == 4


def test_the_page_is_for_operators_and_escapes_names(client, workload, user, operator):
    make_token(user, name="<script>alert(1)</script>")
    token = ApiToken.objects.get()
    job = make_job(workload, submitted_by=user, api_token=token)
    charge(job, "0.25", timezone.now() - dt.timedelta(seconds=30))

    client.force_login(user)
    assert client.get(reverse("spend")).status_code == 403
    client.force_login(operator)
    response = client.get(reverse("spend"))
    html = response.content.decode()
    assert response.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)" not in html
    assert "$0.2500" in html
    assert client.post(reverse("spend")).status_code == 405


def test_the_api_records_the_token_a_job_came_with(client, token, workload, user, redis_conn):
    def post(path, body, **headers):
        return client.post(path, json.dumps(body), content_type="application/json", **headers)

    bearer = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    assert post("/api/jobs", {"workload": workload.name, "input": "a"}, **bearer).status_code == 202
    first = Job.objects.get()
    assert first.api_token == ApiToken.objects.get(user=user)
    replay = post(f"/api/jobs/{first.code}/replay", {}, **bearer)
    assert replay.status_code == 202
    assert Job.objects.get(replay_of=first).api_token == first.api_token

    # A batch made through the API with the token: its jobs carry it too.
    rows = {"workload": workload.name, "rows": [{"input": "c"}, {"input": "d"}]}
    assert post("/api/batches", rows, **bearer).status_code == 201
    assert set(Job.objects.filter(batch__isnull=False).values_list("api_token", flat=True)) == {
        first.api_token_id
    }

    # The browser session's API call (CSRF-checked) names no token.
    client.force_login(user)
    response = post("/api/jobs", {"workload": workload.name, "input": "b"})
    assert response.status_code == 202
    assert Job.objects.get(input_text="b").api_token is None
