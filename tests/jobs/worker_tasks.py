"""Plain RQ functions for the worker tests (tests/jobs/test_worker.py). Worker subprocesses
import them by name, so they live in a module without test-only imports."""

from __future__ import annotations

import time


def spin(seconds: float) -> str:
    """Busy Python code (short sleeps in a loop) for `seconds`: a timer death penalty can stop
    it, unlike one long blocking call."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return "spun"


def hold_redis(seconds: float) -> str:
    """Hold one of this process's Redis connections for `seconds` (a blocking pop nobody
    answers), as a job thread does while RQ or aiqueue talks to Redis, then count itself."""
    from jobs import queueing

    client = queueing.connection()
    client.blpop(["aiqueue:test:nothing"], timeout=seconds)
    client.incr("aiqueue:test:held")
    return "held"


def enqueue_later(seconds: float, then: str) -> str:
    """After `seconds`, put job `then` (a no-op) on this job's queue: what a run does when it
    schedules a retry or a dependent while the queue looks empty."""
    from rq import get_current_job
    from rq.queue import Queue

    time.sleep(seconds)
    current = get_current_job()
    queue = Queue(current.origin, connection=current.connection)
    queue.enqueue("os.getpid", job_id=then, result_ttl=60)
    return "enqueued"
