"""The workers page in chromium, against a real ./run (tests/faults): a worker killed under load
shows as gone, its restart appears with its restart counted, and an operator drains it."""

from __future__ import annotations

import os
import re
import signal

import pytest
from playwright.sync_api import expect

from tests.browser.pages import answer_next_dialog
from tests.faults.conftest import app_factory  # noqa: F401  (the fixture)
from tests.helpers import wait_for
from tests.test_run_script import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.faults, pytest.mark.own_database]


def test_a_killed_worker_shows_as_gone_and_its_restart_appears(app_factory, page):  # noqa: F811
    app = app_factory(AIQUEUE_WORKER_THREADS="4")
    app.start()
    app.sim_control(latency_ms=3000, stream_chunk_delay_ms=0)
    app.submit(40)  # 8 run at once for 3 s each: a load of about 15 s
    page.goto(f"{app.base}/accounts/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{app.base}/")
    page.get_by_role("link", name="Workers").click()

    victim = app.pid("worker:worker-1")
    row = page.locator(f"#workers tr[data-pid='{victim}']")
    expect(row).to_have_attribute("data-status", "busy", timeout=30_000)
    expect(page.locator("#workers tbody tr")).to_have_count(2)
    in_flight = page.locator("#provider-calls tbody tr").first.locator("td.num").first
    expect(in_flight).not_to_have_text("0")

    os.kill(victim, signal.SIGKILL)
    expect(row).to_have_attribute("data-status", "gone", timeout=30_000)
    expect(row.locator(".badge")).to_have_text("gone")
    wait_for(lambda: app.pid("worker:worker-1") not in (victim, 0), timeout=60)
    restarted = app.pid("worker:worker-1")
    new_row = page.locator(f"#workers tr[data-pid='{restarted}']")
    expect(new_row).to_be_visible(timeout=30_000)
    expect(new_row.locator(".worker-restarts")).to_contain_text("1 (worker:worker-1)")
    expect(page.locator("#program-workerworker-1 .process-pid")).to_have_text(str(restarted))
    expect(page.locator("#program-workerworker-1 .process-exits")).to_have_text("1")

    asked = answer_next_dialog(page, accept=True)
    new_row.get_by_role("button", name="Drain").click()
    expect(page.locator(".messages")).to_contain_text("drained: it finishes its runs")
    assert len(asked) == 1
    assert asked[0].startswith("Drain worker worker-1.")
    expect(new_row).to_have_attribute("data-status", re.compile("^drain"))
