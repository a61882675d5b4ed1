"""./run's watchman: a supervisord event listener that makes a crash loop loud and not final.

supervisord (aiqueue/supervisord.conf) restarts a child that exits; one that keeps exiting
within `startsecs` is retried with a growing backoff and, after `startretries`, left in the
FATAL state, where nothing restarts it. This listener, started by the same supervisord:

- logs every unexpected exit and every FATAL ("crash loop: ... gave up"), to stderr
  (var/log/supervision.log) and so to the operator;
- starts a FATAL process again after a longer wait (FATAL_RETRY_S, doubling up to
  FATAL_RETRY_MAX_S): what made it crash (a database that was down, a full disk) may be gone;
- writes the state of every process and its recent exits to `processes.json` in the var
  directory, which the dashboard's health panel shows (`read_status`).

Run as `python -m aiqueue.supervision` by supervisord only: stdin/stdout carry supervisord's
event-listener protocol, so nothing else may print to stdout here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

# How long a FATAL process rests before it is started again, and the cap of the doubling.
FATAL_RETRY_S = 30.0
FATAL_RETRY_MAX_S = 600.0
# Exits counted on the dashboard.
EXIT_WINDOW_S = 600.0
# The dashboard no longer trusts a status file older than this (the listener writes every 5 s).
STALE_AFTER_S = 30.0
STATUS_FILE = "processes.json"


def status_path(var_dir: str | os.PathLike) -> Path:
    return Path(var_dir) / STATUS_FILE


def read_status(var_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the listener last wrote, or None when there is no fresh one (not under ./run, or
    supervisord itself is gone)."""
    try:
        data = json.loads(status_path(var_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or time.time() - data.get("updated_at", 0) > STALE_AFTER_S:
        return None
    return data


class Watchman:
    def __init__(self, rpc, var_dir: str, log=sys.stderr) -> None:
        self.rpc = rpc
        self.var_dir = var_dir
        self.log = log
        self.exits: dict[str, deque[tuple[float, str]]] = {}
        self.fatal_since: dict[str, float] = {}
        self.fatal_wait: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervision: {message}", file=self.log)
        self.log.flush()

    def on_event(self, event: str, headers: dict[str, str]) -> None:
        name = _full_name(headers)
        now = time.time()
        if event == "PROCESS_STATE_EXITED" and headers.get("expected") == "0":
            self._exited(name, now, f"exited unexpectedly (was {headers.get('from_state')})")
        elif event == "PROCESS_STATE_BACKOFF":
            self._exited(name, now, "exited while starting; retrying with backoff")
        elif event == "PROCESS_STATE_FATAL":
            wait = self.fatal_wait.get(name, FATAL_RETRY_S)
            self.fatal_since[name] = now
            self.say(
                f"crash loop: {name} gave up after repeated quick exits (FATAL); "
                f"starting it again in {wait:.0f} s; see its log in var/log/"
            )
        elif event == "PROCESS_STATE_RUNNING":
            if name in self.fatal_since:
                self.fatal_since.pop(name, None)
            elif name in self.fatal_wait:
                self.fatal_wait.pop(name, None)  # up again and stayed up: back to the first wait
        elif event.startswith("TICK"):
            self._restart_fatal(now)
        self.write_status(now)

    def _exited(self, name: str, now: float, why: str) -> None:
        exits = self.exits.setdefault(name, deque())
        exits.append((now, why))
        while exits and exits[0][0] < now - EXIT_WINDOW_S:
            exits.popleft()
        self.say(f"{name} {why}; {len(exits)} exit(s) in the last {EXIT_WINDOW_S / 60:.0f} min")

    def _restart_fatal(self, now: float) -> None:
        for name, since in list(self.fatal_since.items()):
            wait = self.fatal_wait.get(name, FATAL_RETRY_S)
            if now - since < wait:
                continue
            self.fatal_since.pop(name)
            self.fatal_wait[name] = min(wait * 2, FATAL_RETRY_MAX_S)
            self.say(f"starting {name} again after {wait:.0f} s in FATAL")
            try:
                self.rpc.supervisor.startProcess(name, False)
            except Exception as exc:  # noqa: BLE001 - logged; the next FATAL event retries
                self.say(f"could not start {name}: {exc}")

    def write_status(self, now: float) -> None:
        try:
            infos = self.rpc.supervisor.getAllProcessInfo()
        except Exception:  # noqa: BLE001 - supervisord busy or stopping: skip this one
            return
        processes = []
        for info in infos:
            name = _full_name({"groupname": info["group"], "processname": info["name"]})
            if info["group"] == "supervision":
                continue
            exits = [e for e in self.exits.get(name, ()) if e[0] >= now - EXIT_WINDOW_S]
            running = info["statename"] == "RUNNING"
            processes.append(
                {
                    "name": name,
                    "state": info["statename"],
                    "pid": info["pid"],
                    "uptime_s": int(now - info["start"]) if running and info["start"] else None,
                    "exits": len(exits),
                    "last_exit": exits[-1][1] if exits else "",
                    "last_exit_at": exits[-1][0] if exits else None,
                    "crash_loop": info["statename"] in ("BACKOFF", "FATAL") or len(exits) >= 3,
                }
            )
        path = status_path(self.var_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"updated_at": now, "processes": processes}))
        tmp.replace(path)  # atomic: the dashboard never reads half a file


def _full_name(headers: dict[str, str]) -> str:
    group, name = headers.get("groupname", ""), headers.get("processname", "")
    return name if group == name or not group else f"{group}:{name}"


def main() -> None:
    from supervisor import childutils

    rpc = childutils.getRPCInterface(os.environ)
    watchman = Watchman(rpc, os.environ.get("AIQUEUE_VAR_DIR", "var"))
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        event = headers["eventname"]
        body, _ = childutils.eventdata(payload + "\n")
        try:
            watchman.on_event(event, body)
        except Exception as exc:  # noqa: BLE001 - a listener that dies stops the events
            watchman.say(f"event {event} not handled: {exc}")
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
