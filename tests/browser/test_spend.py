"""Spend per API token, in chromium: a job submitted through the API with a token runs on the
real worker, and the operator finds what it cost under that token on the spend page."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from jobs.models import Attempt
from ops.templatetags.dashboard_tags import usd
from tests.browser.pages import log_in, wait_for_status
from tests.factories import make_token, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_operator_finds_a_tokens_spend(live_app, page, workload, user):
    make_user("olga", role="operator")
    key = make_token(user, name="nightly-import")
    answer = httpx.post(
        f"{live_app.url}/api/jobs",
        json={"workload": workload.name, "input": "Notes of the weekly meeting"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert answer.status_code == 202
    job = workload.jobs.get(code=answer.json()["code"])
    wait_for_status(job, "succeeded")
    cost = Attempt.objects.get(job=job).cost
    assert cost > 0

    log_in(page, live_app, "olga", "pw-olga-123")
    page.get_by_role("link", name="Spend").click()
    row = page.locator("#spend-token tr", has_text="nightly-import")
    expect(row).to_contain_text("of alice")
    expect(row.locator("[data-spend-today]")).to_have_text(usd(cost))
    expect(page.locator("#spend-user tr", has_text="alice")).to_contain_text(usd(cost))
