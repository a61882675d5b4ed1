"""Operator controls on the dashboard: POST + CSRF, permission-checked, and audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from jobs import operator, services
from jobs.flow import breaker
from jobs.models import Job, JobEvent, Priority, Provider, Workload
from runs import retries
from runs.admission import PAUSED_REASON
from tests.factories import make_job


@pytest.fixture
def sim(db) -> Provider:
    return Provider.objects.create(name="Sim", kind=Provider.Kind.SIMULATED)


@pytest.fixture
def notes(sim) -> Workload:
    return Workload.objects.create(name="Notes", provider=sim, model="m")


@pytest.fixture
def ops(db) -> User:
    user = User.objects.create_user("otto", password="pw-otto-12345")
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="jobs",
            codename__in=[
                "view_job",
                "change_job",
                "change_workload",
                "change_provider",
                "change_budget",
            ],
        )
    )
    return user


@pytest.fixture
def ops_client(client, ops):
    client.force_login(ops)
    return client


def audit_messages() -> list[str]:
    return [e.change_message for e in LogEntry.objects.order_by("id")]


def test_pause_workload_is_audited(ops_client, ops, notes):
    response = ops_client.post(reverse("operator:pause-workload", args=[notes.pk]))
    assert response.status_code == 302
    notes.refresh_from_db()
    assert notes.is_paused
    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_id, entry.object_repr) == (ops, str(notes.pk), "Notes")
    assert entry.change_message == "Operator: paused the workload"


def test_resume_workload_wakes_the_jobs_paused_with_it(ops_client, ops, notes):
    notes.is_paused = True
    notes.save()
    parked = make_job(
        notes, Job.Status.WAITING, wait_reason=PAUSED_REASON, wait_kind=Job.WaitKind.PAUSED
    )
    # Its text says "paused" too, but it waits for capacity: the kind decides, not the words.
    other = make_job(
        notes,
        Job.Status.WAITING,
        wait_reason="concurrency cap full (1/1) for the paused workload's provider",
        wait_kind=Job.WaitKind.CAPACITY,
    )

    ops_client.post(reverse("operator:resume-workload", args=[notes.pk]))

    notes.refresh_from_db()
    parked.refresh_from_db()
    other.refresh_from_db()
    assert not notes.is_paused
    assert parked.status == Job.Status.QUEUED
    assert other.status == Job.Status.WAITING
    event = parked.events.get(to_status=Job.Status.QUEUED)
    assert event.actor == ops
    assert audit_messages() == ["Operator: resumed the workload"]


def test_cancel_low_priority_cancels_only_the_low_backlog(ops_client, ops, notes):
    low = [
        make_job(notes, status, priority=Priority.LOW)
        for status in (Job.Status.QUEUED, Job.Status.WAITING, Job.Status.HELD)
    ]
    low_running = make_job(notes, Job.Status.RUNNING, priority=Priority.LOW)
    high = make_job(notes, Job.Status.QUEUED, priority=Priority.HIGH)

    ops_client.post(reverse("operator:cancel-low-priority", args=[notes.pk]))

    for job in low:
        job.refresh_from_db()
        assert job.status == Job.Status.CANCELLED
        event = job.events.get(to_status=Job.Status.CANCELLED)
        assert event.actor == ops
        assert "operator" in event.reason
    low_running.refresh_from_db()
    high.refresh_from_db()
    assert (low_running.status, high.status) == (Job.Status.RUNNING, Job.Status.QUEUED)
    assert audit_messages() == ["Operator: cancelled 3 low-priority job(s) not yet started"]


def test_release_held_resumes_jobs_that_fit(ops_client, ops, notes):
    held = make_job(
        notes, Job.Status.HELD, wait_reason="budget 'x' exhausted", wait_kind=Job.WaitKind.BUDGET
    )

    ops_client.post(reverse("operator:release-held"))

    held.refresh_from_db()
    assert held.status == Job.Status.QUEUED
    assert JobEvent.objects.filter(job=held, from_status="held", to_status="queued").exists()
    assert audit_messages() == ["Operator: released 1 held job(s); 0 still held"]


def test_reset_breaker_closes_it_and_wakes_the_jobs_parked_on_it(
    ops_client, ops, sim, notes, redis_conn
):
    for _ in range(sim.breaker_failure_threshold):
        breaker.record(sim, ok=False, was_probe=False, reason="503")
    assert breaker.status(sim).state == "open"
    parked = Job.objects.create(
        workload=notes,
        input_text="x",
        status=Job.Status.WAITING,
        wait_reason=f"{retries.breaker_wait_reason(sim)}; retrying at 10:00",
        wait_kind=Job.WaitKind.BREAKER,
        wait_on=services.provider_wait_on(sim),
        resume_at=timezone.now() + timedelta(minutes=5),
    )
    other = Job.objects.create(
        workload=notes,
        input_text="y",
        status=Job.Status.WAITING,
        wait_reason="workload paused",
        wait_kind=Job.WaitKind.PAUSED,
    )

    ops_client.post(reverse("operator:reset-breaker", args=[sim.pk]))

    assert breaker.status(sim).state == "closed"
    parked.refresh_from_db()
    other.refresh_from_db()
    assert parked.status == Job.Status.QUEUED  # now, not in five minutes
    assert other.status == Job.Status.WAITING  # parked for another reason: left alone
    entry = LogEntry.objects.get()
    assert (entry.object_repr, entry.change_message) == (
        "Sim",
        "Operator: reset the circuit breaker (was open); 1 job(s) woken",
    )


def test_simulator_outage_switch_puts_to_its_control_api(ops_client, ops, simulator):
    ops_client.post(reverse("operator:simulator-faults"), {"action": "outage-on"})
    assert simulator.state()["config"]["outage"] is True

    ops_client.post(reverse("operator:simulator-faults"), {"action": "outage-off"})
    config = simulator.state()["config"]
    assert (config["outage"], config["error_rate"]) == (False, 0.0)
    assert audit_messages() == [
        "Operator: set simulator faults: outage=True",
        "Operator: set simulator faults: error_rate=0.0, mid_stream_error_rate=0.0, "
        "outage=False, overloaded_rate=0.0, quota_exhausted=False, rate_limit_rate=0.0, "
        "refusal_rate=0.0, timeout_rate=0.0",
    ]


def test_the_real_failure_shapes_are_switchable_from_the_dashboard(ops_client, ops, simulator):
    ops_client.post(
        reverse("operator:simulator-faults"),
        {
            "action": "set",
            "latency_ms": "0",
            "error_rate": "0",
            "overloaded_rate": "0.25",
            "refusal_rate": "0.1",
            "mid_stream_error_rate": "0.5",
            "quota_exhausted": "on",
        },
    )
    config = simulator.state()["config"]
    assert config["overloaded_rate"] == 0.25
    assert config["refusal_rate"] == 0.1
    assert config["mid_stream_error_rate"] == 0.5
    assert config["quota_exhausted"] is True
    page = ops_client.get("/").content.decode()
    assert 'data-quota="on"' in page


def test_simulator_latency_and_error_rate_form(ops_client, simulator):
    ops_client.post(
        reverse("operator:simulator-faults"), {"latency_ms": "250", "error_rate": "0.3"}
    )
    config = simulator.state()["config"]
    assert (config["latency_ms"], config["error_rate"]) == (250, 0.3)


def test_simulator_form_rejects_bad_values_and_changes_nothing(ops_client, simulator):
    response = ops_client.post(
        reverse("operator:simulator-faults"),
        {"latency_ms": "-5", "error_rate": "2"},
        follow=True,
    )
    assert "Not applied" in response.content.decode()
    assert simulator.state()["config"]["error_rate"] == 0
    assert not LogEntry.objects.exists()


def test_simulator_that_does_not_answer_is_reported(ops_client, settings, db):
    settings.AIQUEUE_SIMULATOR_URL = "http://127.0.0.1:1"
    response = ops_client.post(
        reverse("operator:simulator-faults"), {"action": "outage-on"}, follow=True
    )
    assert "did not answer" in response.content.decode()
    assert not LogEntry.objects.exists()


def test_htmx_control_answers_with_the_refreshed_panel(ops_client, notes, redis_conn):
    response = ops_client.post(
        reverse("operator:pause-workload", args=[notes.pk]),
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="dashboard-live",
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="dashboard-live"')
    assert "Notes paused" in html
    assert "Resume" in html


CONTROLS = [
    ("operator:pause-workload", True),
    ("operator:resume-workload", True),
    ("operator:cancel-low-priority", True),
    ("operator:release-held", False),
    ("operator:reset-breaker", "provider"),
    ("operator:simulator-faults", False),
]


def control_url(name, arg, notes, sim) -> str:
    if arg is True:
        return reverse(name, args=[notes.pk])
    if arg == "provider":
        return reverse(name, args=[sim.pk])
    return reverse(name)


@pytest.mark.parametrize(("name", "arg"), CONTROLS)
def test_controls_need_the_permission(client, user, notes, sim, name, arg):
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(user)
    assert client.post(control_url(name, arg, notes, sim)).status_code == 403
    assert not LogEntry.objects.exists()


@pytest.mark.parametrize(("name", "arg"), CONTROLS)
def test_controls_need_login(client, notes, sim, name, arg):
    response = client.post(control_url(name, arg, notes, sim))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


@pytest.mark.parametrize(("name", "arg"), CONTROLS)
def test_controls_refuse_get(ops_client, notes, sim, name, arg):
    assert ops_client.get(control_url(name, arg, notes, sim)).status_code == 405


def test_controls_require_csrf(ops, notes):
    client = Client(enforce_csrf_checks=True)
    client.force_login(ops)
    response = client.post(reverse("operator:pause-workload", args=[notes.pk]))
    assert response.status_code == 403
    notes.refresh_from_db()
    assert not notes.is_paused


def test_recent_actions_lists_only_operator_entries(ops, notes):
    operator.do_pause_workload(notes, actor=ops)
    LogEntry.objects.create(user=ops, object_repr="x", action_flag=2, change_message="edit")
    assert [e.change_message for e in operator.recent_actions()] == [
        "Operator: paused the workload"
    ]


def test_admin_pause_action_is_audited_like_the_dashboard_control(client, notes):
    admin_user = User.objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(admin_user)
    client.post(
        reverse("admin:jobs_workload_changelist"),
        {"action": "pause", "_selected_action": [notes.pk]},
    )
    notes.refresh_from_db()
    assert notes.is_paused
    assert audit_messages() == ["Operator: paused the workload"]


@pytest.mark.parametrize(
    "name", ["jobs_job", "jobs_attempt", "jobs_jobevent", "jobs_workload", "jobs_budget"]
)
def test_admin_changelists_render_with_search(client, notes, name):
    admin_user = User.objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(admin_user)
    assert client.get(reverse(f"admin:{name}_changelist"), {"q": "x"}).status_code == 200


def test_a_breaker_wakes_only_its_own_waiters_whatever_their_names(notes, sim, redis_conn):
    eu = Provider.objects.create(name=f"{sim.name} EU", kind=sim.kind)

    def parked_on(provider: Provider) -> Job:
        return Job.objects.create(
            workload=notes,
            input_text="x",
            status=Job.Status.WAITING,
            # "circuit breaker open for Sim EU" starts with Sim's own reason.
            wait_reason=f"{retries.breaker_wait_reason(provider)}; retrying at 10:00",
            wait_kind=Job.WaitKind.BREAKER,
            wait_on=services.provider_wait_on(provider),
        )

    ours, theirs = parked_on(sim), parked_on(eu)
    assert services.wake_breaker_waiters(sim) == 1
    ours.refresh_from_db()
    theirs.refresh_from_db()
    assert (ours.status, theirs.status) == (Job.Status.QUEUED, Job.Status.WAITING)
    assert (ours.wait_kind, ours.wait_on) == ("", "")
