"""Heartbeats for the runs in flight in a threaded worker: one UPDATE for all of them.

Without a threaded worker, `jobs.runner.heartbeat` starts one small thread per run, and that
thread holds its own database connection for the run's whole duration. A worker with 100 runs
in flight would then hold 100 extra connections and write 100 rows every interval. The
threaded worker (`jobs.worker.ThreadPoolWorker`) installs a `RunHeartbeats` for its process
instead: runs register their fencing token, and the worker's monitor thread refreshes
`heartbeat_at` of every registered run with a single `UPDATE ... WHERE run_token IN (...)`.

Tokens identify one run each (a fresh UUID per start), so filtering on the token alone keeps
the fence: a run that was recovered and restarted elsewhere has a new token and is not touched.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from django.utils import timezone

log = logging.getLogger(__name__)

_active: RunHeartbeats | None = None


class RunHeartbeats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[uuid.UUID, tuple[int, Callable[[], None] | None]] = {}

    def add(self, job_pk: int, token: uuid.UUID, on_beat: Callable[[], None] | None = None) -> None:
        with self._lock:
            self._runs[token] = (job_pk, on_beat)

    def remove(self, token: uuid.UUID) -> None:
        with self._lock:
            self._runs.pop(token, None)

    def snapshot(self) -> dict[uuid.UUID, int]:
        """token → job pk of every run in flight."""
        with self._lock:
            return {token: pk for token, (pk, _) in self._runs.items()}

    def beat(self) -> int:
        """Refresh `heartbeat_at` of every registered run and call each run's `on_beat` (lease
        renewal); returns the rows updated."""
        from jobs.models import Job

        with self._lock:
            runs = dict(self._runs)
        if not runs:
            return 0
        updated = Job.objects.filter(run_token__in=list(runs)).update(heartbeat_at=timezone.now())
        for _, on_beat in runs.values():
            if on_beat is None:
                continue
            try:
                on_beat()
            except Exception:
                log.exception("a run's on_beat failed; its next beat will try again")
        return updated


def install(beats: RunHeartbeats | None) -> None:
    """Make `beats` this process's shared heartbeat (None: back to one thread per run)."""
    global _active
    _active = beats


def active() -> RunHeartbeats | None:
    return _active
