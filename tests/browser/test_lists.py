"""Lists with actions in chromium: ticked scheduled jobs run now, a failed job is replayed from
its row, each asked first, and the real worker runs them."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from jobs import services
from jobs.models import Job
from tests.browser.pages import answer_next_dialog, log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def wait_for_status(jobs: list[Job], status: str) -> list[str]:
    deadline = time.monotonic() + 30
    while True:
        statuses = [Job.objects.get(pk=job.pk).status for job in jobs]
        if statuses == [status] * len(jobs) or time.monotonic() > deadline:
            return statuses


def test_run_now_and_replay_from_the_lists(live_app, page, workload, user, operator):
    later = timezone.now() + timedelta(hours=3)
    scheduled = [
        services.do_submit_job(workload=workload, input_text=f"{i}", user=user, start_at=later)[0]
        for i in range(3)
    ]
    failed = Job.objects.create(
        workload=workload, submitted_by=user, input_text="Notes.", status=Job.Status.FAILED,
        error="Rejected in review: wrong", finished_at=timezone.now(),
    )  # fmt: skip
    log_in(page, live_app, "olga", "pw-olga-123")
    page.goto(f"{live_app.url}/jobs/")
    page.get_by_role("link", name="Scheduled and waiting").click()
    expect(page.locator("#action-list tbody tr")).to_have_count(3)
    for job in scheduled[:2]:
        page.locator(f"#list-row-{job.code} input[type=checkbox]").check()

    declined = answer_next_dialog(page, accept=False)
    page.get_by_role("button", name="Run now selected").click()
    assert declined == ["Run now: the 2 selected job(s)?"]
    assert {Job.objects.get(pk=j.pk).status for j in scheduled} == {"scheduled"}

    answer_next_dialog(page, accept=True)
    page.get_by_role("button", name="Run now selected").click()
    expect(page.locator(".messages")).to_contain_text("2 job(s) sent to run now.")
    expect(page.locator("#action-list tbody tr")).to_have_count(1)
    assert wait_for_status(scheduled[:2], "succeeded") == ["succeeded", "succeeded"]
    assert Job.objects.get(pk=scheduled[2].pk).status == "scheduled"

    page.get_by_role("link", name="Failed").click()
    row = page.locator(f"#list-row-{failed.code}")
    expect(row).to_contain_text("Rejected in review: wrong")
    asked = answer_next_dialog(page, accept=True)
    row.get_by_role("button", name="Replay").click()
    expect(page.locator(".messages")).to_contain_text("1 job(s) replayed.")
    assert asked == [f"Replay: job {str(failed.code)[:8]}?"]
    expect(page.locator(".empty")).to_contain_text("No job here")
    assert wait_for_status([failed], "succeeded") == ["succeeded"]
    assert failed.events.get(data__replay=1).actor == operator
