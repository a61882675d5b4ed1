"""The job list's filters and sort live in the URL, in chromium: a reload, Back and the next page
keep them, and the selects show what the table is filtered by."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from playwright.sync_api import expect

from jobs.models import Job
from tests.browser.pages import log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_filters_and_sort_survive_reload_back_and_paging(live_app, page, workload, user):
    for i in range(27):
        Job.objects.create(
            workload=workload, submitted_by=user, input_text=f"row {i}", status=Job.Status.FAILED,
            priority="high" if i < 2 else "default", cost_actual=Decimal(i) / 1000,
        )  # fmt: skip
    Job.objects.create(workload=workload, submitted_by=user, input_text="ok", status="succeeded")
    rows = page.locator("table.jobs tbody tr")
    status, priority = page.locator("#id_status"), page.locator("#id_priority")
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}/jobs/")

    status.select_option("failed")
    expect(page).to_have_url(re.compile(r"[?&]status=failed&"))
    expect(page.locator(".pagination")).to_contain_text("27 jobs")
    priority.select_option("high")
    expect(page.locator(".pagination")).to_contain_text("2 jobs")
    assert "priority=high" in page.url

    page.go_back()
    expect(page.locator(".pagination")).to_contain_text("27 jobs")
    expect(status).to_have_value("failed")
    expect(priority).to_have_value("")
    page.reload()
    expect(page.locator(".pagination")).to_contain_text("27 jobs")
    expect(status).to_have_value("failed")

    page.get_by_role("link", name="Cost (USD)").click()
    expect(page.locator("th[aria-sort=descending]")).to_contain_text("Cost (USD)")
    expect(rows.first.locator("td.num").first).to_have_text("0.026000")
    expect(status).to_have_value("failed")
    page.get_by_role("link", name="Older →").click()
    expect(page.locator(".pagination")).to_contain_text("Page 2 of 2 · 27 jobs")
    expect(rows).to_have_count(2)
    expect(rows.first.locator("td.num").first).to_have_text("0.001000")
    assert "sort=-cost" in page.url
    assert "status=failed" in page.url
    expect(rows.first).to_contain_text(" s ago")
