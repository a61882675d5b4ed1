"""Pages on a phone-sized screen: nothing makes the whole page scroll sideways (wide tables
scroll inside themselves)."""

from __future__ import annotations

import pytest

from jobs import services
from tests.browser.pages import log_in
from tests.factories import make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_pages_fit_a_390_px_screen(live_app, browser, workload, user):
    reviewer = make_user("rita", role="reviewer")
    for index in range(3):
        services.do_submit_job(
            workload=workload, input_text=f"Meeting {index}: hiring, budget.", user=reviewer
        )
    context = browser.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    try:
        log_in(page, live_app, "rita", "pw-rita-123")
        widths = {}
        for path in ("/", "/jobs/", "/jobs/new/", "/review/", "/batches/", "/batches/new/"):
            page.goto(f"{live_app.url}{path}")
            page.wait_for_load_state("networkidle")
            widths[path] = page.evaluate("document.documentElement.scrollWidth")
        assert widths == dict.fromkeys(widths, 390)
    finally:
        context.close()
