from __future__ import annotations

import pytest
from playwright.sync_api import expect

from jobs.models import Job
from tests.browser.pages import log_in

pytestmark = pytest.mark.browser


def test_staff_submits_a_job_and_sees_it_succeed(live_app, page, user, workload):
    log_in(page, live_app, "alice", "pw-alice-123")

    page.click("text=New job")
    page.select_option("#id_workload", label=workload.name)
    page.fill("#id_input_text", "Notes: we agreed to ship on Friday <b>no matter what</b>.")
    page.click("button:has-text('Submit job')")

    job = Job.objects.get()
    page.wait_for_url(f"{live_app.url}{job.get_absolute_url()}")
    expect(page.locator(".message.success")).to_contain_text("Job submitted")
    # The page follows the job without a reload until it finishes.
    expect(page.locator("#job-status .badge")).to_have_text("Succeeded", timeout=30_000)
    job.refresh_from_db()
    expect(page.locator("#job-output")).to_have_text(job.output_text)
    expect(page.locator("#job-cost")).to_contain_text(f"{job.cost_actual:.6f}")
    assert job.cost_actual > 0
    # Submitted markup is shown as text, never interpreted.
    expect(page.locator("pre.output").last).to_contain_text("<b>no matter what</b>")


def test_login_is_required(live_app, page, db):
    page.goto(f"{live_app.url}/jobs/")
    expect(page).to_have_url(f"{live_app.url}/accounts/login/?next=/jobs/")
