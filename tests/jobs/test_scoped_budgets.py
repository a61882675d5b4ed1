"""Budgets scoped to a submitter, an API token or a model (as well as a workload, or global):
which jobs count against which, with the real database, worker code and simulator."""

from __future__ import annotations

import json
from decimal import ROUND_DOWN, Decimal

import pytest

from jobs import services
from jobs.flow import budgets
from jobs.models import ApiToken, Attempt, Budget, BudgetReservation, Job, ModelPrice
from tests.factories import make_token, make_user, make_workload, submit

pytestmark = pytest.mark.django_db

TEXT = "Quarterly meeting: hiring plan, budget review, office move."


def budget(name: str, cap: str = "1", **scope) -> Budget:
    return Budget.objects.create(name=name, cap_usd=Decimal(cap), **scope)


def room_for(workload, jobs: float) -> str:
    """A cap as the admin stores it (4 decimals, rounded down) with room for `jobs` jobs."""
    nanos = budgets.estimate(workload, TEXT).nanos * jobs
    return str((Decimal(nanos) / 10**9).quantize(Decimal("0.0001"), rounding=ROUND_DOWN))


def names(found: list[Budget]) -> list[str]:
    return [b.name for b in found]


def test_a_job_counts_against_each_budget_whose_every_scope_matches(workload, provider, user):
    bob = make_user("bob")
    make_token(user, name="nightly")
    token = ApiToken.objects.get()
    ModelPrice.objects.create(
        provider=provider, model="sim-large", input_per_mtok=3, output_per_mtok=6
    )
    other = make_workload(provider, name="Other", model="sim-large")
    budget("global")
    budget("alice", user=user)
    budget("bob", user=bob)
    budget("nightly", api_token=token)
    budget("small model", model="sim-small")
    budget("alice on other", user=user, workload=other)

    from_page = submit(workload, user, TEXT)
    assert names(budgets.budgets_for(from_page)) == ["global", "alice", "small model"]
    from_token = submit(workload, user, TEXT, api_token=token)
    assert names(budgets.budgets_for(from_token)) == [
        "global",
        "alice",
        "nightly",
        "small model",
    ]
    bobs = submit(other, bob, TEXT)
    assert names(budgets.budgets_for(bobs)) == ["global", "bob"]
    # A retry on another model (a reviewer's override) counts on that model's budgets.
    assert names(budgets.budgets_for(from_page, {"model": "sim-large"})) == ["global", "alice"]
    # What the submit reserved is what budgets_for says.
    assert set(
        BudgetReservation.objects.filter(job=from_token).values_list("budget__name", flat=True)
    ) == {"global", "alice", "nightly", "small model"}


def test_a_token_scoped_budget_holds_only_that_tokens_jobs(client, workload, user, redis_conn):
    key = make_token(user, name="nightly")
    token = ApiToken.objects.get()
    one_job = budgets.estimate(workload, TEXT).nanos
    capped = budget("nightly", cap=room_for(workload, 1.5), api_token=token)

    def post(**headers):
        return client.post(
            "/api/jobs",
            json.dumps({"workload": workload.name, "input": TEXT}),
            content_type="application/json",
            **headers,
        )

    bearer = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    first, second = post(**bearer), post(**bearer)
    assert (first.status_code, second.status_code) == (202, 202)
    statuses = list(Job.objects.order_by("pk").values_list("status", flat=True))
    assert statuses == ["queued", "held"]  # the second does not fit beside the first
    held = Job.objects.get(status="held")
    assert held.wait_kind == Job.WaitKind.BUDGET
    assert "nightly" in held.wait_reason

    # The same user's page submission is not the token's: it is not held.
    page_job = submit(workload, user, TEXT)
    assert page_job.status == "queued"
    capped.refresh_from_db()
    assert capped.reserved_nanos == one_job


def test_the_run_settles_on_the_scoped_budgets_and_leaves_the_rest(
    redis_conn, workload, user, run_worker
):
    mine = budget("alice", user=user)
    theirs = budget("bob", user=make_user("bob"))
    job = submit(workload, user, TEXT)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    cost = Attempt.objects.get(job=job).cost
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert (mine.spent_usd, mine.reserved_nanos) == (cost, 0)
    assert (theirs.spent_nanos, theirs.reserved_nanos) == (0, 0)


def test_a_user_scoped_rejecting_budget_refuses_only_that_user(workload, user, redis_conn):
    budget("alice", cap=room_for(workload, 1.5), user=user, on_exhausted=Budget.OnExhausted.REJECT)
    assert submit(workload, user, TEXT).status == "queued"
    with pytest.raises(services.Overloaded, match="alice"):
        submit(workload, user, TEXT)
    assert submit(workload, make_user("bob"), TEXT).status == "queued"


def test_scope_is_shown_in_the_admin_and_on_the_dashboard(admin_client, workload, user):
    make_token(user, name="nightly")
    token = ApiToken.objects.get()
    scoped = budget("scoped", user=user, api_token=token, model="sim-small", workload=workload)
    assert scoped.scope_text == (
        f"workload {workload.name}, user alice, token nightly, model sim-small"
    )
    assert budget("everyone").scope_text == "global"
    listing = admin_client.get("/admin/jobs/budget/").content.decode()
    assert "workload " + workload.name + ", user alice, token nightly, model sim-small" in listing
    form = admin_client.get(f"/admin/jobs/budget/{scoped.pk}/change/").content.decode()
    for field in ("id_workload", "id_user", "id_api_token", "id_model"):
        assert f'id="{field}"' in form
    dashboard = admin_client.get("/").content.decode()
    assert "user alice, token nightly" in dashboard
