"""Destructive actions ask first (static/js/confirm.js): declining leaves everything as it was."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from jobs.models import Job
from tests.browser.pages import answer_next_dialog, log_in, submit_held_back

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_cancel_on_the_job_page_asks_first(live_app, page, user, workload, monkeypatch):
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}{job.get_absolute_url()}")
    cancel = page.get_by_role("button", name="Cancel job")

    declined = answer_next_dialog(page, accept=False)
    cancel.click()
    assert declined == ["Cancel this job? It will not run again."]
    expect(page.locator("#job-status .badge")).to_have_text("Queued")
    job.refresh_from_db()
    assert job.status == "queued"

    accepted = answer_next_dialog(page, accept=True)
    cancel.click()
    expect(page.locator(".messages")).to_contain_text("Job cancelled.")
    assert accepted == ["Cancel this job? It will not run again."]
    expect(page.locator("#job-status .badge")).to_have_text("Cancelled")
    job.refresh_from_db()
    assert job.status == "cancelled"


def test_cancel_selected_on_the_list_says_how_many_and_asks_first(
    live_app, page, user, workload, monkeypatch
):
    jobs = [submit_held_back(workload, user, monkeypatch) for _ in range(3)]
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}/jobs/")
    for job in jobs[:2]:
        page.locator(f"#job-row-{job.code} input[type=checkbox]").check()
    cancel = page.get_by_role("button", name="Cancel selected")

    declined = answer_next_dialog(page, accept=False)
    cancel.click()
    assert declined == ["Cancel the 2 selected job(s)? They will not run again."]
    assert {Job.objects.get(pk=job.pk).status for job in jobs} == {"queued"}

    accepted = answer_next_dialog(page, accept=True)
    cancel.click()
    expect(page.locator(".messages")).to_contain_text("2 job(s) cancelled.")
    assert len(accepted) == 1
    assert [Job.objects.get(pk=job.pk).status for job in jobs] == [
        "cancelled",
        "cancelled",
        "queued",
    ]
