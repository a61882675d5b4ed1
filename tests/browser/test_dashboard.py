"""The operations dashboard in a real browser: rehearse a provider outage from the dashboard and
watch the system absorb it, without reloading the page.

Set AIQUEUE_DASHBOARD_SCREENSHOT=docs/dashboard.png to also save a screenshot taken while the
system is under load (the README shows it).
"""

from __future__ import annotations

import os
import sys
from decimal import Decimal

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from playwright.sync_api import expect

from aiqueue.redis_server import free_port
from jobs.models import Budget, Job, ModelPrice, Priority, Provider, Workload
from tests.browser.pages import LiveApp, answer_next_dialog, log_in
from tests.factories import submit
from tests.helpers import BASE_DIR, database_url, spawn, wait_for_port

pytestmark = pytest.mark.browser


@pytest.fixture
def app_with_scheduler(transactional_db, simulator, redis_conn, tmp_path):
    """uvicorn plus one worker that also runs RQ's scheduler, which wakes parked jobs."""
    port = free_port()
    env = {
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "AIQUEUE_SIMULATOR_URL": simulator.url,
        "AIQUEUE_RECONCILE_INTERVAL": "2",
        "AIQUEUE_CAPACITY_RECHECK": "2",
        # The retry budget forgets the outage's failed calls after 10 s instead of 60 s.
        "AIQUEUE_RETRY_BUDGET_WINDOW": "10",
        "PYTHONPATH": str(BASE_DIR),
    }
    web = spawn(
        [sys.executable, "-m", "uvicorn", "aiqueue.asgi:application", "--port", str(port),
         "--log-level", "warning"],
        tmp_path,
        env,
    )  # fmt: skip
    worker = spawn([sys.executable, "manage.py", "worker"], tmp_path, env)
    try:
        wait_for_port(port)
        yield LiveApp(url=f"http://127.0.0.1:{port}", port=port, start_web=None, web=web)
    finally:
        for process in (web, worker):
            process.terminate()
        for process in (web, worker):
            process.wait(timeout=15)


@pytest.fixture
def incident_setup(simulator):
    provider = Provider.objects.create(
        name="Simulated GPT",
        kind=Provider.Kind.SIMULATED,
        base_url=f"{simulator.url}/v1",
        breaker_failure_threshold=2,
        breaker_cooldown_s=2,
        read_timeout_s=5,
    )
    ModelPrice.objects.create(
        provider=provider,
        model="sim-small",
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("2"),
    )
    workload = Workload.objects.create(
        name="Support summaries",
        kind=Workload.Kind.SUMMARIZE,
        provider=provider,
        model="sim-small",
        max_attempts=10,
        max_output_tokens=100,
    )
    Budget.objects.create(name="Monthly spend", cap_usd=Decimal("50"))
    User.objects.create_superuser("root", "root@example.com", "pw-root-12345")
    return provider, workload


def submit_tickets(workload: Workload, n: int, priority: str = Priority.DEFAULT) -> None:
    for i in range(n):
        submit(workload, None, f"Ticket {i}: the printer is on fire.", priority=priority)


def test_outage_rehearsed_from_the_dashboard_is_absorbed_live(
    app_with_scheduler, page, incident_setup
):
    provider, workload = incident_setup
    log_in(page, app_with_scheduler, "root", "pw-root-12345")
    breaker = page.locator(f"#provider-{provider.pk} [data-breaker]")
    waiting = page.locator("#health-waiting .value")
    expect(breaker).to_have_text("closed")
    expect(waiting).to_have_text("0")
    # A marker that a reload would wipe: everything below happens on this one page load.
    page.evaluate("window.__sameLoad = true")

    # It asks first (static/js/confirm.js): declined, nothing changes.
    declined = answer_next_dialog(page, accept=False)
    page.click("button:has-text('Start outage')")
    assert [text[:16] for text in declined] == ["Start an outage?"]
    page.wait_for_timeout(500)
    expect(page.locator("#simulator [data-outage]")).to_have_attribute("data-outage", "off")
    answer_next_dialog(page, accept=True)
    page.click("button:has-text('Start outage')")
    expect(page.locator("#simulator [data-outage]")).to_have_attribute(
        "data-outage", "on", timeout=15_000
    )
    submit_tickets(workload, 6)

    # The breaker opens after two failed calls and the jobs wait instead of failing.
    expect(breaker).to_have_text("open", timeout=30_000)
    expect(waiting).not_to_have_text("0", timeout=30_000)
    assert int(waiting.inner_text()) > 0
    expect(page.locator("#health-waiting [data-reason]").first).to_be_visible()

    page.click("button:has-text('End outage')")
    expect(page.locator("#simulator [data-outage]")).to_have_attribute(
        "data-outage", "off", timeout=15_000
    )
    submit_tickets(workload, 10, Priority.LOW)

    screenshot = os.environ.get("AIQUEUE_DASHBOARD_SCREENSHOT")
    if screenshot:
        page.set_viewport_size({"width": 1360, "height": 1500})
        expect(breaker).to_have_text("closed", timeout=30_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(BASE_DIR / screenshot), full_page=True)

    # A half-open probe succeeds, the breaker closes and every waiting job runs.
    expect(breaker).to_have_text("closed", timeout=40_000)
    expect(waiting).to_have_text("0", timeout=60_000)
    expect(page.locator("#health-queued .value")).to_have_text("0", timeout=60_000)
    assert page.evaluate("window.__sameLoad") is True
    expect(page.locator("#health-running .value")).to_have_text("0", timeout=60_000)
    assert Job.objects.filter(status=Job.Status.SUCCEEDED).count() == 16
    # The jobs submitted after the page loaded are listed, with their final status.
    recent = page.locator("#recent-jobs tbody tr")
    expect(recent).to_have_count(10, timeout=15_000)
    expect(recent.filter(has_text="Succeeded")).to_have_count(10, timeout=15_000)
    assert page.evaluate("window.__sameLoad") is True

    # With real figures in it, the workloads table fits a laptop's screen: the operator's
    # controls are in view without scrolling sideways.
    page.set_viewport_size({"width": 1280, "height": 900})
    # Measured in one script: the panel is re-fetched and swapped every 5 s, so two separate
    # lookups could straddle a swap.
    scroll_width, visible_width, pause_right, box_right = page.evaluate(
        """(row) => {
            const box = document.querySelector('#workload-health').parentElement;
            const pause = [...document.querySelectorAll(`#${row} button`)]
                .find((button) => button.textContent.trim() === 'Pause');
            return [box.scrollWidth, box.clientWidth, pause.getBoundingClientRect().right,
                    box.getBoundingClientRect().right];
        }""",
        f"workload-{workload.pk}",
    )
    assert scroll_width <= visible_width
    assert pause_right <= box_right
