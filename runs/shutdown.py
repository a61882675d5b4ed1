"""This process is stopping: the flag a stopping worker raises for its runs.

A worker asked to stop (SIGTERM, Ctrl-C) lets the calls in flight finish within its grace
period, but starts no new call: a run that would call the provider, first call or retry, is
handed back to the queue instead (runs.retries), and a call that fails while the process is
stopping does not use up one of the job's attempts (runs.runner.call_provider). The system
stopping is not the job's fault.
"""

from __future__ import annotations

import threading

_stopping = threading.Event()

HANDED_BACK = "handed back: the worker stopped before the run finished"


def begin() -> None:
    _stopping.set()


def is_stopping() -> bool:
    return _stopping.is_set()


def reset() -> None:
    """For a process that runs a worker again after one stopped (the test suite)."""
    _stopping.clear()
