"""The dashboard's charts in chromium (the vendored uPlot, static/js/charts.js): drawn within the
page's CSP, a hover shows the value of that minute, a split draws a line per workload, a drag
zooms and the zoom survives the dashboard's live refresh, "Reset zoom" gives the span back."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from jobs.models import Attempt, Job, Provider, Workload
from tests.browser.pages import log_in
from tests.factories import make_job, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def finished(workload: Workload, at: dt.datetime, cost: str) -> None:
    job = make_job(workload)
    Attempt.objects.create(
        job=job,
        number=1,
        provider=workload.provider,
        model=workload.model,
        started_at=at - dt.timedelta(seconds=2),
        ended_at=at,
        cost=Decimal(cost),
    )
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.SUCCEEDED, started_at=at - dt.timedelta(seconds=2), finished_at=at
    )


def bucket_of(page, at: dt.datetime) -> tuple[int, int]:
    """(index of the chart bucket holding `at`, number of buckets), from the page's own data:
    counting back from the last bucket missed it when a minute turned while the page loaded."""
    starts = page.evaluate("JSON.parse(document.getElementById('chart-data').textContent).x")
    return max(i for i, start in enumerate(starts) if start <= at.timestamp()), len(starts)


def test_charts_hover_split_and_zoom(live_app, page, workload):
    other = Workload.objects.create(
        name="Contract digests",
        kind=Workload.Kind.SUMMARIZE,
        provider=Provider.objects.create(
            name="Second provider", kind=Provider.Kind.SIMULATED, base_url="http://127.0.0.1:9/v1"
        ),
        model="m",
    )
    # Ten minutes ago: three jobs of one workload and one of the other, in one bucket.
    ten_ago = timezone.now() - dt.timedelta(minutes=10)
    for _ in range(3):
        finished(workload, ten_ago, "0.01")
    finished(other, ten_ago, "0.02")
    make_user("olga", role="operator")
    refused: list[str] = []
    page.on(
        "console",
        lambda message: (
            refused.append(message.text)
            if "Content Security Policy" in message.text or message.type == "error"
            else None
        ),
    )

    log_in(page, live_app, "olga", "pw-olga-123")
    plots = page.locator("#trends .plot[data-chart]")
    expect(plots).to_have_count(4)
    expect(page.locator("#trends .plot .uplot canvas")).to_have_count(4)

    # Point at the bucket ten minutes ago: the legend gives that minute's figure.
    throughput = page.locator('.plot[data-chart="throughput"]')
    throughput.scroll_into_view_if_needed()
    box = throughput.locator(".u-over").bounding_box()
    index, buckets = bucket_of(page, ten_ago)
    x = box["x"] + box["width"] * index / (buckets - 1)
    page.mouse.move(x, box["y"] + box["height"] / 2)
    expect(throughput.locator(".u-legend .u-series").nth(1).locator(".u-value")).to_have_text(
        "4/min"
    )

    # Per workload: a line for each, the biggest first, with its own hover value.
    page.get_by_role("link", name="Per workload").click()
    page.wait_for_url("**split=workload**")
    throughput = page.locator('.plot[data-chart="throughput"]')
    legend = throughput.locator(".u-legend .u-series")
    expect(legend.nth(1)).to_contain_text(workload.name)
    expect(legend.nth(2)).to_contain_text("Contract digests")
    throughput.scroll_into_view_if_needed()
    box = throughput.locator(".u-over").bounding_box()
    index, buckets = bucket_of(page, ten_ago)
    page.mouse.move(box["x"] + box["width"] * index / (buckets - 1), box["y"] + box["height"] / 2)
    expect(legend.nth(1).locator(".u-value")).to_have_text("3/min")
    expect(legend.nth(2).locator(".u-value")).to_have_text("1/min")

    # Drag across the middle: zoomed, and still zoomed after the next live refresh.
    page.evaluate(
        "window.__settled = 0;"
        "document.body.addEventListener('htmx:afterSettle', () => window.__settled++)"
    )
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=5)
    page.mouse.up()
    expect(throughput).to_have_attribute("data-zoomed", "")
    expect(throughput.locator(".zoomed")).to_contain_text("Zoomed to")
    page.wait_for_function("() => window.__settled >= 1", timeout=20_000)
    expect(throughput).to_have_attribute("data-zoomed", "")
    assert page.evaluate(
        "(() => { const u = document.querySelector('.plot[data-chart=throughput]')._plot;"
        " const x = u.data[0]; return u.scales.x.min > x[0] && u.scales.x.max < x[x.length-1]; })()"
    )

    throughput.get_by_role("button", name="Reset zoom").click()
    expect(throughput).not_to_have_attribute("data-zoomed", "")
    assert page.evaluate(
        "(() => { const u = document.querySelector('.plot[data-chart=throughput]')._plot;"
        " const x = u.data[0];"
        " return u.scales.x.min <= x[0] && u.scales.x.max >= x[x.length-1]; })()"
    )
    assert refused == []
