"""The run timeline on a job page, in chromium, for a job run by the real worker: it waits on
its provider's breaker and retries twice, and the page shows each step as it happens."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from jobs import queueing
from tests.browser.pages import log_in, open_live_page, submit_held_back

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_timeline_of_a_job_that_waited_on_the_breaker_and_retried_twice(
    live_app, page, workload, user, simulator, monkeypatch
):
    provider = workload.provider
    provider.breaker_failure_threshold = 2
    provider.breaker_cooldown_s = 1
    provider.breaker_probe_successes = 1
    provider.save()
    simulator.control(script=[503, 503])
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    open_live_page(page, f"{live_app.url}{job.get_absolute_url()}")
    steps = page.locator("#job-timeline .timeline > li")
    expect(steps).to_have_count(1)
    expect(steps.first).to_contain_text("Queued")

    queueing.enqueue(job)  # the worker runs it: two 503s open the breaker, the probe succeeds
    expect(page.locator("#job-status .badge")).to_have_text("Succeeded", timeout=60_000)
    labels = page.locator("#job-timeline .step-label")
    expect(labels).to_have_text(
        [
            "Queued",
            "Running",
            "Waiting for the provider's breaker",
            "Queued again",
            "Running",
            "Succeeded",
        ]
    )
    wait = page.locator("#job-timeline .step-wait")
    expect(wait).to_contain_text(f"circuit breaker open for {provider.name}")
    calls = page.locator("#job-timeline .step-attempts li")
    expect(calls).to_have_count(3)
    expect(calls.nth(0)).to_contain_text("attempt #1")
    expect(calls.nth(0)).not_to_contain_text("after the previous call")
    expect(calls.nth(1)).to_contain_text("after the previous call · attempt #2")
    expect(calls.nth(2)).to_contain_text("after the previous call · attempt #3")
    expect(calls.nth(2)).to_contain_text("tokens · $")
    # The flat history stays below it.
    expect(page.locator("#job-timeline + #job-attempts + #job-events")).to_be_visible()
