"""Benchmark "timeline": CPU per live update spent on the job page's run timeline card.

    .venv/bin/python bench/timeline.py [--runs 2000]

In process, no database: a job that waited on its breaker and retried twice (6 audit events,
3 attempts), as jobs.live reads them. Prints the CPU time of `jobs.timeline.build` and of
rendering the `job-timeline` partial, beside the `job-attempts` partial of the same job (the
attempts table every update already renders).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    runs = parser.parse_args().runs
    os.environ.setdefault("AIQUEUE_VAR_DIR", tempfile.mkdtemp())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")
    import django

    django.setup()
    from django.template.loader import render_to_string

    from jobs import timeline
    from jobs.models import Attempt, JobEvent

    start = datetime(2026, 1, 5, 10, tzinfo=UTC)

    def event(seconds: float, was: str, now: str, reason: str = "", **data) -> JobEvent:
        moved = JobEvent(
            created_at=start + timedelta(seconds=seconds),
            from_status=was,
            to_status=now,
            reason=reason,
            data=data,
        )
        moved.actor_name = None  # as jobs.live's raw read of the history gives it
        return moved

    events = [
        event(0, "", "queued", "submitted"),
        event(1, "queued", "running", "started", worker="w"),
        event(3, "running", "waiting", "circuit breaker open for Sim; retrying at 10:00:40"),
        event(40, "waiting", "queued", "circuit breaker half-open: probe"),
        event(41, "queued", "running", "started"),
        event(42, "running", "succeeded", "completed"),
    ]
    attempts = []
    for number, (began, ended, error) in enumerate(
        [(1.1, 1.5, "server_error"), (2.0, 2.5, "server_error"), (41.2, 41.9, "")], 1
    ):
        call = Attempt(
            number=number,
            started_at=start + timedelta(seconds=began),
            ended_at=start + timedelta(seconds=ended),
            tokens_in=10,
            tokens_out=5,
            cost=Decimal("0.00002"),
            error_class=error,
            model="sim-small",
        )
        call.provider_name = "Sim"
        attempts.append(call)

    def cpu_us(fn) -> float:
        fn()  # load and compile the template once
        began = time.process_time()
        for _ in range(runs):
            fn()
        return (time.process_time() - began) / runs * 1e6

    steps = timeline.build(events, attempts)
    rows = [
        ("timeline.build", cpu_us(lambda: timeline.build(events, attempts))),
        (
            "render job-timeline",
            cpu_us(
                lambda: render_to_string(
                    "jobs/detail.html#job-timeline", {"timeline": steps, "oob": True}
                )
            ),
        ),
        (
            "render job-attempts (beside)",
            cpu_us(
                lambda: render_to_string(
                    "jobs/detail.html#job-attempts", {"attempts": attempts, "oob": True}
                )
            ),
        ),
    ]
    print(f"| step ({runs} runs) | CPU µs per update |")
    print("|---|---|")
    for name, micros in rows:
        print(f"| {name} | {micros:.0f} |")


if __name__ == "__main__":
    main()
