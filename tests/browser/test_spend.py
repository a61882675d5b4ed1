"""Spend per API token and a token-scoped budget, in chromium: a job submitted through the API
with a token runs on the real worker and the operator finds its cost under that token; a
budget scoped to the token holds its next job, and the operator sees which and why."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from playwright.sync_api import expect

from jobs.flow import budgets
from jobs.models import ApiToken, Attempt, Budget, Job
from ops.templatetags.dashboard_tags import usd
from tests.browser.pages import log_in, wait_for_status
from tests.factories import make_token, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

TEXT = "Notes of the weekly meeting"


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


def test_a_token_scoped_budget_holds_that_tokens_jobs_and_the_operator_sees_why(
    live_app, page, workload, user
):
    make_user("olga", role="operator")
    key = make_token(user, name="nightly-import")
    token = ApiToken.objects.get(name="nightly-import")
    # One job's worst case fits, two do not; and once the first has run and given back what
    # it did not spend, the second still does not (else the worker releases it meanwhile).
    room = budgets.estimate(workload, TEXT).nanos * 21 // 20
    Budget.objects.create(
        name="nightly cap",
        api_token=token,
        cap_usd=Decimal(room) / 10**9,  # the cap in nanos is exact (Budget.save)
    )
    codes = []
    for _ in range(2):
        answer = httpx.post(
            f"{live_app.url}/api/jobs",
            json={"workload": workload.name, "input": TEXT},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert answer.status_code == 202
        codes.append(answer.json()["code"])
    assert Job.objects.get(code=codes[0]).status != "held"
    held = Job.objects.get(code=codes[1])
    assert held.status == "held"

    log_in(page, live_app, "olga", "pw-olga-123")
    page.goto(f"{live_app.url}/jobs/lists/held/")
    row = page.locator(f"#list-row-{held.code}")
    expect(row).to_contain_text("budget 'nightly cap' exhausted")
    page.goto(f"{live_app.url}/")
    expect(page.locator("#budgets")).to_contain_text("token nightly-import")
