"""Heartbeats of the runs in flight: one UPDATE for all of a process's runs, one code path.

Runs register their fencing token with a `RunHeartbeats`, and each beat refreshes
`heartbeat_at` of every registered run with a single `UPDATE ... WHERE run_token IN (...)`.
The worker (`runs.worker.Worker`) installs one for its process and beats it from its monitor
thread: a worker with 100 runs in flight holds no extra connection and writes one statement
per interval. A process that runs jobs without that worker gets one beaten by a thread of its
own (`for_this_process`): the same object and the same beat.

Tokens identify one run each (a fresh UUID per start), so filtering on the token alone keeps
the fence: a run that was recovered and restarted elsewhere has a new token and is not touched.

A beat is also when a run learns that it should stop: its job was cancelled or recovered
elsewhere (the token no longer matches a running row), or it passed its deadline (the beat
expires it). Each such run's `on_lost(reason)` is called; the runner then cuts its streamed
call at the next chunk (runs.runner.RunStop).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from django.conf import settings
from django.db import connection
from django.utils import timezone

from jobs import services
from jobs.models import Job

log = logging.getLogger(__name__)

_active: RunHeartbeats | None = None
_install_lock = threading.Lock()


OnBeat = Callable[[], None]
OnLost = Callable[[str], None]


class RunHeartbeats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[uuid.UUID, tuple[int, OnBeat | None, OnLost | None]] = {}

    def add(
        self,
        job_pk: int,
        token: uuid.UUID,
        on_beat: OnBeat | None = None,
        on_lost: OnLost | None = None,
    ) -> None:
        with self._lock:
            self._runs[token] = (job_pk, on_beat, on_lost)

    def remove(self, token: uuid.UUID) -> None:
        with self._lock:
            self._runs.pop(token, None)

    def snapshot(self) -> dict[uuid.UUID, int]:
        """token → job pk of every run in flight."""
        with self._lock:
            return {token: pk for token, (pk, _, _) in self._runs.items()}

    def beat(self) -> int:
        """Refresh `heartbeat_at` of every registered run that is still running, call each
        one's `on_beat` (lease renewal), and `on_lost` for the runs that must stop; returns
        the rows updated."""
        with self._lock:
            runs = dict(self._runs)
        if not runs:
            return 0
        alive = check_runs(Job.objects.filter(run_token__in=list(runs), status=Job.Status.RUNNING))
        updated = 0
        if alive:
            updated = Job.objects.filter(run_token__in=list(alive)).update(
                heartbeat_at=timezone.now()
            )
        for token, (_, on_beat, on_lost) in runs.items():
            try:
                if token in alive:
                    if on_beat is not None:
                        on_beat()
                else:
                    # Told once: the run stops, and its row is no longer beaten for.
                    self.remove(token)
                    if on_lost is not None:
                        on_lost(LOST)
            except Exception:
                log.exception("a run's heartbeat callback failed; its next beat will try again")
        return updated


# What a run is told when its row is no longer running under its token.
LOST = "the job is no longer this run's (cancelled, expired or recovered)"


def check_runs(running) -> set[uuid.UUID]:
    """The tokens of the runs in `running` (a queryset of running jobs) that may go on:
    those past their job's deadline are expired here (jobs.services.do_expire_run)."""
    now = timezone.now()
    alive = set()
    for job in running.only("id", "code", "submitted_by_id", "run_token", "status", "deadline"):
        if job.is_past_deadline(now):
            if services.do_expire_run(job, job.run_token):
                log.info("job=%s expired while running: deadline passed", job.code)
            continue
        alive.add(job.run_token)
    return alive


def for_this_process() -> RunHeartbeats:
    """The process's heartbeat, which every run registers with: the one the worker installed
    (runs.worker.Worker beats it from its monitor thread), or, in a process that runs jobs
    without it (a plain `rqworker`, a script), one installed here and beaten every
    AIQUEUE_HEARTBEAT_INTERVAL by a thread of its own while it stays installed."""
    global _active
    with _install_lock:
        if _active is not None:
            return _active
        beats = _active = RunHeartbeats()

    def loop() -> None:
        interval = settings.AIQUEUE_HEARTBEAT_INTERVAL
        while _active is beats:
            time.sleep(interval)
            try:
                beats.beat()
            except Exception:
                log.exception("heartbeat of the runs in flight failed; next beat will retry")
            finally:
                # Django connections are per thread: this one would otherwise leak.
                connection.close()

    threading.Thread(target=loop, name="run-heartbeats", daemon=True).start()
    return beats


def install(beats: RunHeartbeats | None) -> None:
    """Make `beats` this process's heartbeat (the worker's; None when it stops)."""
    global _active
    with _install_lock:
        _active = beats
