"""The dashboard page: operators see workload health; others see their own jobs only."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User

from jobs.models import Job, Provider, Workload


@pytest.fixture
def notes(db) -> Workload:
    sim = Provider.objects.create(name="Sim", kind=Provider.Kind.SIMULATED)
    return Workload.objects.create(name="Notes", provider=sim, model="m")


@pytest.fixture
def viewer(db) -> User:
    user = User.objects.create_user("vera", password="pw-vera-12345")
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    return user


def test_operator_sees_health_figures_without_controls_they_lack(client, viewer, notes, redis_conn):
    Job.objects.create(workload=notes, input_text="x", status=Job.Status.WAITING,
                       wait_reason="circuit breaker open for Sim; retrying at 10:00",
                       wait_kind=Job.WaitKind.BREAKER)  # fmt: skip
    client.force_login(viewer)
    html = client.get("/").content.decode()
    assert 'id="dashboard-live"' in html
    assert 'data-reason="breaker"' in html
    assert 'data-breaker="closed"' in html
    # view_job only: no control buttons.
    assert "/operator/" not in html


def test_providers_show_calls_per_job_retries_and_the_breaker_failure_rate(
    client, viewer, notes, redis_conn
):
    from django.utils import timezone

    from jobs.flow import breaker
    from jobs.models import Attempt

    sim = notes.provider
    for i, numbers in enumerate([[1, 2], [1], [1, 2, 3]]):
        job = Job.objects.create(workload=notes, input_text=f"x{i}")
        for n in numbers:
            Attempt.objects.create(
                job=job, number=n, provider=sim, model="m", started_at=timezone.now()
            )
    for ok in [False, True, True, False, True]:
        breaker.record(sim, ok=ok, was_probe=False, reason="503")
    client.force_login(viewer)
    html = client.get("/").content.decode()
    row = re.search(rf'<tr id="provider-{sim.pk}">(.*?)</tr>', html, re.S).group(1)
    cells = [
        " ".join(re.sub(r"<[^>]+>", " ", c).split())
        for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    ]
    # 6 calls for 3 jobs; 3 of them a job's second or third; 2 of the breaker's 5 calls failed.
    assert cells[2:4] == ["2.00", "50.0%"]
    assert cells[5].startswith("40.0% of 5 / 40.0%")


def test_plain_user_does_not_see_the_health_panel(user_client, notes):
    html = user_client.get("/").content.decode()
    assert 'id="dashboard-live"' not in html
    assert 'id="job-counters"' in html


def test_health_panel_refresh_renders_only_the_panel(client, viewer, notes, redis_conn):
    client.force_login(viewer)
    response = client.get("/?span=day", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="dashboard-live")
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="dashboard-live"')
    assert "?span=day" in html
    assert 'id="job-counters"' not in html


def test_counters_refresh_still_renders_only_the_counters(client, viewer, notes):
    client.force_login(viewer)
    response = client.get("/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="job-counters")
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="counters" id="job-counters"')
    assert "dashboard-live" not in html


def test_recent_jobs_refresh_shows_new_jobs_and_only_the_viewers_own(
    user_client, user, other_user, notes
):
    def refresh() -> str:
        response = user_client.get("/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="recent-jobs")
        assert response.status_code == 200
        return response.content.decode()

    html = refresh()
    assert html.lstrip().startswith('<section class="card" id="recent-jobs"')
    assert "No jobs yet" in html
    assert 'id="job-counters"' not in html

    # Jobs that arrive after the page was loaded show up on the next refresh.
    mine = Job.objects.create(workload=notes, input_text="x", submitted_by=user)
    theirs = Job.objects.create(workload=notes, input_text="y", submitted_by=other_user)
    html = refresh()
    assert "No jobs yet" not in html
    assert str(mine.code)[:8] in html
    assert str(theirs.code)[:8] not in html


def test_health_panel_refresh_is_refused_to_plain_users(user_client, notes):
    response = user_client.get("/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="dashboard-live")
    assert response.status_code == 403


def queued_tile(html: str) -> int:
    found = re.search(r'id="health-queued">\s*<span class="label">Queued</span>'
                      r'<span class="value">(\d+)<', html)  # fmt: skip
    assert found, html[:2000]
    return int(found.group(1))


def test_health_figures_are_shared_for_a_moment_and_fresh_after_an_action(
    client, viewer, notes, redis_conn, settings, django_assert_max_num_queries
):
    settings.AIQUEUE_DASHBOARD_CACHE_SECONDS = 60
    viewer.user_permissions.add(Permission.objects.get(codename="change_workload"))
    client.force_login(viewer)
    panel = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "dashboard-live"}
    assert queued_tile(client.get("/", **panel).content.decode()) == 0

    # Another load within the window: none of the aggregate queries, the same figures.
    Job.objects.create(workload=notes, input_text="x", status=Job.Status.QUEUED)
    with django_assert_max_num_queries(6):
        html = client.get("/", **panel).content.decode()
    assert queued_tile(html) == 0

    # An operator's action shows at once: the shared figures are dropped.
    html = client.post(f"/operator/workloads/{notes.pk}/pause/", **panel).content.decode()
    assert "paused</span>" in html
    assert queued_tile(html) == 1  # the job created above, no longer hidden by the cache


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (None, "–"),
        (Decimal("0"), "$0.0000"),
        (Decimal("0.000047"), "$0.000047"),  # a few calls: not "$0.0000"
        (Decimal("0.0123"), "$0.0123"),
        (Decimal("12.5"), "$12.50"),
    ],
)
def test_dashboard_money_shows_a_fraction_of_a_cent(amount, shown):
    from ops.templatetags.dashboard_tags import MISSING, usd

    assert usd(amount) == (MISSING if amount is None else shown)
