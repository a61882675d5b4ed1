"""Operator actions: the controls on the dashboard. Each is permission-checked by its view and
audited here: job changes through `services` (a JobEvent per job, with the operator as actor),
everything else as a Django admin LogEntry (shown in the admin's "Recent actions" and on the
dashboard), so every control leaves a record of who did what, when.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
from django.conf import settings
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.contenttypes.models import ContentType
from django.db import models, transaction

from jobs import credit, drain, services
from jobs.flow import breaker
from jobs.models import Job, Priority, Provider, Workload

log = logging.getLogger(__name__)

# Every LogEntry written here starts with this, so the dashboard can list operator actions
# apart from ordinary admin edits.
AUDIT_PREFIX = "Operator: "
# Statuses a bulk cancel of a workload's low-priority backlog covers: everything not started.
BACKLOG_STATUSES = (Job.Status.QUEUED, Job.Status.WAITING, Job.Status.HELD, Job.Status.SCHEDULED)
SIMULATOR_TIMEOUT_S = 5.0
# The fault switches the dashboard offers, with the simulator's config key and type.
SIMULATOR_FAULTS = {
    "latency_ms": int,
    "error_rate": float,
    "outage": bool,
    "overloaded_rate": float,
    "refusal_rate": float,
    "mid_stream_error_rate": float,
    "quota_exhausted": bool,
}
ALL_CLEAR = {
    "outage": False,
    "error_rate": 0.0,
    "rate_limit_rate": 0.0,
    "timeout_rate": 0.0,
    "overloaded_rate": 0.0,
    "refusal_rate": 0.0,
    "mid_stream_error_rate": 0.0,
    "quota_exhausted": False,
}


class OperatorError(Exception):
    """The action could not be carried out; the message is safe to show to the operator."""


def audit(
    actor: AbstractBaseUser, obj: models.Model | None, message: str, subject: str = ""
) -> LogEntry:
    """Record an operator action; `subject` names what it acted on when there is no row."""
    return LogEntry.objects.create(
        user_id=actor.pk,
        content_type=ContentType.objects.get_for_model(obj) if obj is not None else None,
        object_id=str(obj.pk) if obj is not None else None,
        object_repr=(str(obj) if obj is not None else subject)[:200],
        action_flag=CHANGE,
        change_message=AUDIT_PREFIX + message,
    )


def recent_actions(limit: int = 8) -> list[LogEntry]:
    return list(
        LogEntry.objects.filter(change_message__startswith=AUDIT_PREFIX)
        .select_related("user")
        .order_by("-action_time", "-id")[:limit]
    )


def do_pause_workload(workload: Workload, *, actor: AbstractBaseUser) -> bool:
    """Stop accepting and starting jobs of `workload`: submissions are refused, and admission
    parks its queued jobs ("workload paused") until it is resumed. Running jobs finish.
    Returns False if it was paused already."""
    with transaction.atomic():
        changed = Workload.objects.filter(pk=workload.pk, is_paused=False).update(is_paused=True)
        if changed:
            audit(actor, workload, "paused the workload")
    workload.is_paused = True
    return bool(changed)


def do_resume_workload(workload: Workload, *, actor: AbstractBaseUser) -> bool:
    """Accept and start jobs again, and wake the jobs admission parked while it was paused."""
    with transaction.atomic():
        changed = Workload.objects.filter(pk=workload.pk, is_paused=True).update(is_paused=False)
        if changed:
            audit(actor, workload, "resumed the workload")
    workload.is_paused = False
    if changed:
        services.wake_paused(workload, actor=actor)
    return bool(changed)


def do_reset_breaker(provider: Provider, *, actor: AbstractBaseUser) -> str:
    """Close the provider's circuit breaker by hand (`reset_breaker`), for an operator, with
    an audit entry. Returns the state it was in."""
    try:
        previous, woken = reset_breaker(provider, by=actor.get_username())
    except Exception as exc:  # noqa: BLE001 - Redis down: tell the operator, change nothing
        raise OperatorError(f"Could not reset the breaker: {type(exc).__name__}") from exc
    audit(actor, provider, f"reset the circuit breaker (was {previous}); {woken} job(s) woken")
    return previous


def reset_breaker(provider: Provider, *, by: str) -> tuple[str, int]:
    """Close the breaker and send the jobs parked on it back to their queues now (rather
    than at their resume times). Returns (the state it was in, jobs woken). The dashboard's
    control and the admin's both come here."""
    previous = breaker.reset(provider, by=by)
    return previous, services.provider_recovered(provider)


def do_clear_out_of_credit(provider: Provider, *, actor: AbstractBaseUser) -> int:
    """Credit was added to the provider's account: calls go to it again and the jobs held for
    its credit are released (those that fit their budgets). Returns how many were released."""
    if not credit.is_out_of_credit(provider):
        raise OperatorError(f"{provider.name} is not marked out of credit.")
    released = credit.clear(provider)
    audit(actor, provider, f"cleared out of credit; {released} held job(s) released")
    return released


def do_release_held(*, actor: AbstractBaseUser) -> int:
    """Release held jobs that now fit their budgets (after an operator raised a cap), highest
    priority first. Admission is decided again by services.do_release_held: each released
    job reserves its worst-case cost, and a job that still does not fit stays held. Each
    released job gets a JobEvent (held → queued); the operator's action is the LogEntry."""
    released = services.do_release_held()
    held_left = Job.objects.filter(status=Job.Status.HELD).count()
    audit(actor, None, f"released {released} held job(s); {held_left} still held", "budgets")
    return released


def do_cancel_low_priority(workload: Workload, *, actor: AbstractBaseUser) -> int:
    """Cancel every low-priority job of `workload` that has not started (shed load)."""
    cancelled = 0
    jobs = Job.objects.filter(
        workload=workload, priority=Priority.LOW, status__in=BACKLOG_STATUSES
    ).order_by("pk")
    for job in jobs.iterator(chunk_size=500):
        if services.do_cancel_job(
            job, actor=actor, reason="low-priority backlog cancelled by an operator"
        ):
            cancelled += 1
    audit(actor, workload, f"cancelled {cancelled} low-priority job(s) not yet started")
    return cancelled


def simulator_url() -> str:
    return settings.AIQUEUE_SIMULATOR_URL.rstrip("/") + "/_control"


_control: tuple[int, httpx.Client] | None = None


def control_client() -> httpx.Client:
    """One client per process for the simulator's control API: `httpx.get()` builds a client,
    and with it an SSL context, per call (~50 ms here), on every operator's dashboard load."""
    global _control
    if _control is None or _control[0] != os.getpid():
        _control = (os.getpid(), httpx.Client())
    return _control[1]


def simulator_state() -> dict[str, Any] | None:
    """The simulator's current config and counters, or None if it does not answer."""
    try:
        response = control_client().get(simulator_url(), timeout=1.0)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError):
        return None


def do_set_simulator_faults(faults: dict[str, Any], *, actor: AbstractBaseUser) -> dict[str, Any]:
    """PUT fault switches to the simulator's control API (see simulator/server.py)."""
    try:
        response = control_client().put(simulator_url(), json=faults, timeout=SIMULATOR_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise OperatorError(f"The simulator did not answer: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise OperatorError(f"The simulator refused the change: {response.text[:200]}")
    described = ", ".join(f"{key}={value}" for key, value in sorted(faults.items()))
    audit(actor, None, f"set simulator faults: {described}", "simulator")
    return response.json()


def do_drain_worker(name: str, *, actor: AbstractBaseUser) -> bool:
    """Ask worker `name` to take no more jobs (jobs.drain); False if it already was."""
    done = drain.request(name)
    if done:
        audit(actor, None, "drained the worker: it takes no new jobs", f"worker {name}")
    return done


def do_undrain_worker(name: str, *, actor: AbstractBaseUser) -> bool:
    """Let a drained worker take jobs again; False if it was not drained."""
    done = drain.withdraw(name)
    if done:
        audit(actor, None, "resumed the drained worker", f"worker {name}")
    return done
