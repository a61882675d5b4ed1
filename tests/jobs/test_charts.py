"""The dashboard's charts (ops/charts.py and the splits of ops/stats.series): what each chart
plots, per total, workload and provider; drawn in a browser in tests/browser/test_charts.py."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
from django.utils import timezone

from jobs.models import Attempt, Job, Provider, Workload
from ops import charts, dashboard, stats
from tests.factories import make_job

START = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
STARTS = [START + dt.timedelta(minutes=i) for i in range(5)]


def test_a_chart_carries_its_values_with_gaps_and_says_its_latest_and_peak():
    chart = charts.line_chart("throughput", "Throughput", "/min", [("jobs", [0, 5, None, 10, 2])])
    [line] = chart.lines
    assert line.values == [0.0, 5.0, None, 10.0, 2.0]  # None: a gap, drawn as one
    assert line.last == "2/min"
    assert chart.max_label == "10/min"
    data = charts.payload(STARTS, [chart])
    assert data["x"] == [int(start.timestamp()) for start in STARTS]
    assert data["charts"]["throughput"]["series"] == [{"label": "jobs", "values": line.values}]
    json.dumps(data)  # what the page embeds


def test_no_data_says_so():
    chart = charts.line_chart("spend", "Spend", "$", [("USD", [None] * 5)])
    assert chart.lines[0].last == "–"
    assert chart.max_label == "$0.0000"


def test_money_keeps_four_decimals_below_a_dollar():
    chart = charts.line_chart(
        "spend", "Spend", "$", [("USD", [Decimal("0.0024"), Decimal("12.5")])]
    )
    assert chart.lines[0].last == "$12.50"
    small = charts.line_chart("spend", "Spend", "$", [("USD", [Decimal("0.0024")])])
    assert small.lines[0].last == "$0.0024"


def finish(job: Job, provider: Provider, cost: str, seconds: float, at: dt.datetime) -> None:
    Attempt.objects.create(
        job=job,
        number=1,
        provider=provider,
        model="m",
        started_at=at - dt.timedelta(seconds=seconds),
        ended_at=at,
        cost=Decimal(cost),
    )
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.SUCCEEDED, started_at=at - dt.timedelta(seconds=seconds), finished_at=at
    )


@pytest.mark.django_db
def test_the_splits_add_up_to_the_totals(user, workload):
    other_provider = Provider.objects.create(
        name="Other", kind=Provider.Kind.SIMULATED, base_url="http://127.0.0.1:9/v1"
    )
    other = Workload.objects.create(
        name="Other work", kind=Workload.Kind.SUMMARIZE, provider=other_provider, model="m"
    )
    now = timezone.now()
    a = now - dt.timedelta(minutes=3)
    for i in range(3):
        finish(make_job(workload, submitted_by=user), workload.provider, "0.010", 2 + i, a)
    finish(make_job(other, submitted_by=user), other_provider, "0.005", 10, a)
    finish(
        make_job(other, submitted_by=user),
        other_provider,
        "0.005",
        10,
        now - dt.timedelta(minutes=1),
    )

    series = stats.series("hour", now)
    total = sum(series.throughput)
    by_workload = series.by_workload["throughput"]
    assert set(by_workload) == {workload.name, "Other work"}
    assert sum(sum(v) for v in by_workload.values()) == pytest.approx(total) == 5
    assert sum(by_workload[workload.name]) == 3  # the biggest first
    assert list(by_workload)[0] == workload.name
    spend_total = sum(series.spend)
    assert spend_total == Decimal("0.040")
    for split in (series.by_workload["spend"], series.by_provider["spend"]):
        assert sum(sum(v) for v in split.values()) == spend_total
    assert sum(sum(v) for v in series.by_provider["calls"].values()) == 5
    assert max(v for v in series.by_workload["run_time_p95"]["Other work"] if v) == 10
    assert max(v for v in series.by_provider["call_time_p95"][workload.provider.name] if v) == 4

    # The dashboard's charts per split: same keys, a line per name.
    for split, names in (
        ("workload", {workload.name, "Other work"}),
        ("provider", {workload.provider.name, "Other"}),
    ):
        built = {chart.key: chart for chart in dashboard.build_charts(series, split)}
        assert set(built) == {"throughput", "latency", "spend", "depth"}
        assert {line.label for line in built["spend"].lines} == names
        assert built["depth"].note  # the depth chart says it is not split
    assert [line.label for line in dashboard.build_charts(series)[0].lines] == ["jobs finished"]


def test_past_the_limit_the_smallest_names_are_summed_as_others():
    by_name = {f"w{i}": {0: 10 - i} for i in range(10)}
    top = stats._top(by_name, 1, float)
    assert len(top) == stats.SPLIT_LIMIT
    assert list(top)[: stats.SPLIT_LIMIT - 1] == [f"w{i}" for i in range(stats.SPLIT_LIMIT - 1)]
    assert top[stats.OTHERS] == [sum(10 - i for i in range(stats.SPLIT_LIMIT - 1, 10))]
    assert sum(v[0] for v in top.values()) == sum(10 - i for i in range(10))
