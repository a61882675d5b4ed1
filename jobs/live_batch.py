"""Coalesced list updates: one frame per list group per short interval, across every process,
carrying the latest state of every row that changed in it.

A burst of 1,000 submissions made every open job list receive ~92 websocket messages a second
(one per row change), more than anyone can read and work the web process did while it also
took the burst. Batching per process still sent one frame per interval from each publishing
process (the web process and every worker: ~14 a second per list with two workers). So the
changes are gathered in Redis instead, and one process sends each group's frame:

- a process whose job changed adds the job to the group's pending hash and tries to open the
  group's window (`SET NX` with a time to live). The one that opens it owns the frame: one
  `AIQUEUE_LIVE_LIST_INTERVAL_MS` later (0: a frame per change, as before; bench/live.py
  compares them) it takes the hash and closes the window in one step (`_TAKE`), reads each
  row from the database and sends one `jobs.update` message with `items`, one per job;
- the others only add to the hash. In case the owner dies before it sends, each of them looks
  again once the window's time to live has passed, and sends what is still pending (the Lua
  take lets only one of them have it, and never while a live owner's window is open).

Rendering when the frame is made, not at the change, means a frame shows the rows as they are;
a frame that arrives after a newer one is still possible (two owners in a row, one slow), and
the page drops a row older than the one it shows (Job.live_version, static/js/live.js). The
parts that describe the whole list (the counters, the "a job was created" marker) go once per
frame. A frame always follows the last change, and a process sends the windows it owns when
it exits. The job page's own updates are not batched (jobs.live sends them at once).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import connection
from django.template.loader import render_to_string

from jobs import live, queueing
from jobs.models import Job

log = logging.getLogger(__name__)

PENDING_KEY = "aiqueue:live:list:{group}:pending"  # job pk -> "1" if it was created, else "0"
WINDOW_KEY = "aiqueue:live:list:{group}:window"  # the owner's token while a frame is due
# A pending hash nobody took (every process gone) is dropped after this long.
PENDING_TTL_S = 3600

# Take a group's pending jobs and close its window, unless another process's window is open
# (that process sends them). KEYS: pending, window. ARGV: this process's token.
_TAKE = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return false end
local items = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return items
"""


def window_ms() -> int:
    """How long a window stays open without its owner: long enough that a live owner always
    sends first, short enough that a dead one's frame is late by little."""
    return max(4 * settings.AIQUEUE_LIVE_LIST_INTERVAL_MS, 2000)


class ListBatcher:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        # group -> (monotonic time to act, whether this process owns its window)
        self._due: dict[str, tuple[float, bool]] = {}
        self._pid = 0
        self._token = ""

    def add(self, job, groups: list[str], *, created: bool = False) -> None:
        """`job` changed; the list `groups` (those with a socket) should show it."""
        if settings.AIQUEUE_LIVE_LIST_INTERVAL_MS == 0:
            live.send(
                [
                    (group, {"type": "jobs.update", "items": [message["parts"]]})
                    for group, message in live.render_list_updates(
                        job, created=created, only=set(groups)
                    )
                ]
            )
            return
        self._started()
        try:
            opened = self.mark({job.pk: created}, groups)
        except Exception:
            log.warning("live: could not note a list change", exc_info=True)
            return
        self._schedule(groups, opened)

    def _started(self) -> None:
        with self._changed:
            if self._pid != os.getpid():  # first use, or a forked child: its own thread
                self._due, self._pid, self._token = {}, os.getpid(), uuid.uuid4().hex
                threading.Thread(target=self._run, name="live-lists", daemon=True).start()
                atexit.register(self.flush)

    def mark(self, jobs: dict[int, bool], groups: list[str]) -> set[str]:
        """Add `jobs` (pk -> created) to each group's pending hash; returns the groups whose
        window this call opened, and so whose frame this process sends."""
        with queueing.connection().pipeline(transaction=False) as pipe:
            for group in groups:
                key = PENDING_KEY.format(group=group)
                for pk, created in jobs.items():
                    # "created" sticks: the frame must carry the new-job marker.
                    (pipe.hset if created else pipe.hsetnx)(key, str(pk), int(created))
                pipe.expire(key, PENDING_TTL_S)
                pipe.set(WINDOW_KEY.format(group=group), self._token, nx=True, px=window_ms())
            results = pipe.execute()
        per_group = len(jobs) + 2
        return {
            group
            for index, group in enumerate(groups)
            if results[(index + 1) * per_group - 1]  # the SET NX
        }

    def _schedule(self, groups: list[str], opened: set[str]) -> None:
        interval = settings.AIQUEUE_LIVE_LIST_INTERVAL_MS / 1000
        now = time.monotonic()
        with self._changed:
            for group in groups:
                when, owned = self._due.get(group, (float("inf"), False))
                if group in opened:
                    # This change opened the window: its frame is due one interval from now,
                    # whatever an earlier window (already taken) had scheduled.
                    self._due[group] = (now + interval, True)
                elif not owned:
                    # Look again after the owner's window would have lapsed.
                    self._due[group] = (min(when, now + window_ms() / 1000 + interval), False)
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    now = time.monotonic()
                    ready = [group for group, (when, _) in self._due.items() if when <= now]
                    if ready:
                        for group in ready:
                            del self._due[group]
                        break
                    if self._due:
                        self._changed.wait(min(when for when, _ in self._due.values()) - now)
                    else:
                        self._changed.wait()
            self.send(ready)

    def flush(self) -> None:
        """Send now every frame this process owns or was to look after (at exit)."""
        with self._changed:
            groups, self._due = list(self._due), {}
        self.send(groups)

    def send(self, groups: list[str]) -> None:
        """Take each group's pending jobs (unless a live owner's window holds them), render
        and send them."""
        if not groups:
            return
        try:
            taken = self._take(groups)
            pending: dict[int, tuple[bool, set[str]]] = {}
            for group, items in taken.items():
                for pk, created in items.items():
                    was_created, listening = pending.get(pk, (False, set()))
                    pending[pk] = (was_created or created, listening | {group})
            if not pending:
                return
            try:
                sent = live.send(render_frames(pending))
            except Exception:
                log.warning("live: list frames failed", exc_info=True)
                sent = False
            if not sent:
                # Rendered afresh next time: a lost frame must not leave a list on an old state.
                for group, items in taken.items():
                    self._schedule([group], self.mark(items, [group]))
        except Exception:
            log.warning("live: list frames of %s failed", groups, exc_info=True)
        finally:
            if threading.current_thread() is not threading.main_thread():
                connection.close()  # this thread's own; pooled ones go back to the pool

    def _take(self, groups: list[str]) -> dict[str, dict[int, bool]]:
        with queueing.connection().pipeline(transaction=False) as pipe:
            for group in groups:
                keys = (PENDING_KEY.format(group=group), WINDOW_KEY.format(group=group))
                pipe.eval(_TAKE, 2, *keys, self._token)
            results = pipe.execute()
        taken = {}
        for group, flat in zip(groups, results, strict=True):
            if flat:
                taken[group] = {
                    int(flat[i]): flat[i + 1] in (b"1", "1") for i in range(0, len(flat), 2)
                }
        return taken


def render_frames(pending: dict[int, tuple[bool, set[str]]]) -> list[tuple[str, dict[str, Any]]]:
    """One `jobs.update` message per group: each changed job's row parts as they are now,
    the whole-list parts once, rendered for the group's last job."""
    jobs = Job.objects.select_related(*live.RENDER_RELATED).in_bulk(list(pending))
    new_marker = render_to_string("jobs/list.html#job-list-new", {"oob": True})
    frames: dict[str, list[dict[str, str]]] = {}
    last: dict[str, tuple[Job, Any]] = {}
    created_in: set[str] = set()
    for pk, (created, groups) in pending.items():
        job = jobs.get(pk)
        if job is None:
            continue
        for group, visible in live.list_groups(job):
            if group not in groups:
                continue
            item = {
                name: render(job, visible())
                for name, render in live.LIST_PARTS.items()
                if name not in live.WHOLE_LIST_PARTS
            }
            frames.setdefault(group, []).append(item)
            last[group] = (job, visible)
            if created:
                created_in.add(group)
    for group, (job, visible) in last.items():
        jobs_seen = visible()
        for name in live.WHOLE_LIST_PARTS:
            frames[group][-1][name] = live.LIST_PARTS[name](job, jobs_seen)
        if group in created_in:
            frames[group][-1][live.NEW_JOB_PART] = new_marker
    return [(group, {"type": "jobs.update", "items": items}) for group, items in frames.items()]


batcher = ListBatcher()
# jobs.live hands list updates to it; it is imported (and so registered) by jobs.apps.
live.list_batcher = batcher
