"""Replaying a job: what may be replayed, with which overrides, and the news review listens to.

A replay re-opens the same Job (its status goes back to queued) rather than copying it: its
attempts, audit events and review items stay one history, the next call takes the next attempt
number, and `runs.retries.ledger` counts the paid attempts of the new run only (a replay is a
"tried again" transition, like a reviewer's retry). The action itself is
`jobs.services.do_replay_job`; this module holds its rules so the views, the API and the
services share them.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal
from django.utils import timezone

from jobs.models import Job, Workload

# What a replay (or a reviewer's retry) may change, over the workload's settings; the runner
# applies them (runs.runner.build_request, jobs.flow.budgets.chosen_target).
OVERRIDE_KEYS = ("provider_id", "model", "temperature", "prompt")

# Sent inside the replay's transaction, once the job is queued again: a job that waited for
# review has its open review items closed in the same transaction (review.receivers).
# Arguments: job, actor.
job_replayed = Signal()


class ReplayError(Exception):
    """The replay was refused; the message is safe to show to the person who asked."""


def why_not_replayable(job: Job) -> str | None:
    """Why `job` cannot be replayed now (Job.can_replay), or None."""
    if job.can_replay():
        return None
    if job.workload.kind == Workload.Kind.DOCUMENT:
        return "A document cannot be replayed; submit the document again."
    return f"The job is {job.get_status_display().lower()}: only a finished job can be replayed."


def clean_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The known, non-empty overrides."""
    return {
        key: value
        for key, value in (overrides or {}).items()
        if key in OVERRIDE_KEYS and value not in (None, "")
    }


def replays_so_far(job: Job) -> int:
    """How many times the job was replayed (its audit log's replay events)."""
    return job.events.filter(data__has_key="replay").count()


def fresh_run_fields() -> dict[str, Any]:
    """A job sent back to the queue for another run (a replay, a reviewer's retry) keeps none
    of what the last run left: its output, error and progress."""
    return {
        "output_text": "",
        "confidence": None,
        "corrected_output": "",
        "output_data": None,
        "error": "",
        "error_class": "",
        "stage": "queued",
        "progress_percent": 0,
        "progress_message": "",
        "queued_at": timezone.now(),
    }
