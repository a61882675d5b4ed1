"""Replaying the failed jobs a filtered list shows, in chromium: the list's filters choose the
jobs, the confirmation states their count, and the real worker runs them again."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from jobs.models import Job, Workload
from tests.browser.pages import answer_next_dialog, log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def failed_job(workload: Workload, user) -> Job:
    return Job.objects.create(
        workload=workload,
        submitted_by=user,
        input_text="A text to summarize.",
        status=Job.Status.FAILED,
        stage="done",
        error="Rejected in review: wrong",
    )


def test_bulk_replay_from_a_filtered_list(live_app, page, workload, provider, user, operator):
    other = Workload.objects.create(
        name="Other work", kind=Workload.Kind.SUMMARIZE, provider=provider, model="sim-small"
    )
    chosen = [failed_job(workload, user) for _ in range(3)]
    untouched = [failed_job(other, user), Job.objects.create(
        workload=workload, submitted_by=user, input_text="done", status=Job.Status.SUCCEEDED
    )]  # fmt: skip
    log_in(page, live_app, "olga", "pw-olga-123")
    page.goto(f"{live_app.url}/jobs/")
    page.select_option("#id_status", "failed")
    expect(page).to_have_url(re.compile(r"[?&]status=failed&"))
    page.select_option("#id_workload", str(workload.pk))
    expect(page.locator("table.jobs tbody tr")).to_have_count(3)

    page.get_by_role("link", name="Replay the finished jobs of this list…").click()
    expect(page.locator("#replay-count")).to_contain_text("3 finished jobs match")
    expect(page.locator("#replay-count")).to_contain_text("workload Summaries")
    accepted = answer_next_dialog(page, accept=True)
    page.get_by_role("button", name="Replay 3 jobs").click()
    expect(page.locator(".messages")).to_contain_text("3 job(s) replayed.")
    assert accepted == ["Replay 3 jobs? Each runs again and its calls are paid."]
    # Back on the list with its filters: the replayed jobs are no longer failed.
    assert f"workload={workload.pk}" in page.url
    assert "status=failed" in page.url
    expect(page.locator(".empty")).to_contain_text("No jobs match these filters")

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        statuses = [Job.objects.get(pk=job.pk).status for job in chosen]
        if statuses == ["succeeded"] * 3:
            break
        time.sleep(0.2)
    assert statuses == ["succeeded"] * 3
    for job in chosen:
        assert job.events.filter(data__replay=1, actor=operator).exists()
    assert [Job.objects.get(pk=job.pk).status for job in untouched] == ["failed", "succeeded"]

    page.goto(f"{live_app.url}{chosen[0].get_absolute_url()}")
    expect(page.locator("#job-status .badge")).to_have_text("Succeeded")
    expect(page.locator("#job-events")).to_contain_text("failed → queued")
    expect(page.locator("#job-events")).to_contain_text("replayed (run 2)")
