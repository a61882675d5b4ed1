"""Who runs a job: the worker process's identity, and whether that process is still alive.

A run whose heartbeat stopped may belong to a dead worker (SIGKILL, OOM, a crash) or to a
stalled one (SIGSTOP, a long GC or swap pause, a frozen VM) that may still read its call's
answer. From another host the two look the same, so recovery waits for the in-flight call's
deadline (runs.reconcile). On the same host they can be told apart: a dead process is gone
from the process table, a stalled one is still in it. A run records its worker as
"host/pid/start" (`Job.run_by`), where start is the process's start time in clock ticks since
boot, so a pid reused by another process is not taken for the old worker.
"""

from __future__ import annotations

import functools
import os
import socket


def _start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time since boot); None if there is no such process
    or only its zombie (dead, not yet reaped); "?" if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    # The command name (field 2) is in parentheses and may itself contain spaces.
    fields = raw.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else "?"


@functools.cache
def _identity(pid: int) -> str:
    return f"{socket.gethostname()}/{pid}/{_start_ticks(pid) or '?'}"


def identity() -> str:
    """This process, as `Job.run_by` records it (computed once per process; a forked child
    has a new pid and so gets its own)."""
    return _identity(os.getpid())


def host_prefix() -> str:
    return f"{socket.gethostname()}/"


def is_dead(run_by: str) -> bool:
    """True only when `run_by` names a process on this host that no longer exists. A process
    on another host, an unreadable record or a stalled process: False (it may still answer)."""
    host, _, rest = run_by.partition("/")
    pid_text, _, start = rest.partition("/")
    if host != socket.gethostname() or not pid_text.isdigit() or not start or start == "?":
        return False
    current = _start_ticks(int(pid_text))
    if current is None:
        return True  # no such pid
    return current not in ("?", start)  # the pid now belongs to another process
