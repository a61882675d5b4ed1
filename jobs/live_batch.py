"""Coalesced list updates: one frame per list group per short interval, carrying the latest
state of every row that changed in it.

A burst of 1,000 submissions made every open job list receive ~92 websocket messages a second
(one per row change), more than anyone can read and work the web process did while it also
took the burst. Here a publishing process notes which jobs changed for which list groups, and
a thread of its own renders them at most every `AIQUEUE_LIVE_LIST_INTERVAL_MS` (0: a frame
per change, as before; bench/live.py compares the two): one `jobs.update` message per group
with `items`, one per job, each row read from the database when the frame is made. Rendering
then rather than at the change matters: the web process (a job's creation) and the workers
(its run) publish the same row, and a frame that one of them sends late would otherwise put
an older state over a newer one. The parts that describe the whole list (the counters, the
"a job was created" marker) go once per frame. A frame always follows the last change, and
a process flushes what it holds when it exits. The job page's own updates are not batched
(jobs.live sends them at once).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from django.conf import settings
from django.db import connection
from django.template.loader import render_to_string

from jobs import live
from jobs.models import Job

log = logging.getLogger(__name__)


class ListBatcher:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        # job pk -> (created, the list groups that listen for it)
        self._pending: dict[int, tuple[bool, set[str]]] = {}
        # When the pending set last went from empty to not: its frame is due one interval later.
        self._opened = 0.0
        self._pid = 0

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
        with self._changed:
            if self._pid != os.getpid():  # first use, or a forked child: its own thread
                self._pending, self._pid = {}, os.getpid()
                threading.Thread(target=self._run, name="live-lists", daemon=True).start()
                atexit.register(self.flush)
            self._note(job.pk, created, set(groups))

    def _note(self, pk: int, created: bool, groups: set[str]) -> None:
        """Add to the pending set; the caller holds the lock."""
        if not self._pending:
            self._opened = time.monotonic()
        was_created, listening = self._pending.get(pk, (False, set()))
        self._pending[pk] = (was_created or created, listening | groups)
        self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                # The interval counts from the first change of the pending set, not from
                # whenever this thread last woke: a set flushed meanwhile (at exit, or by a
                # caller) and filled again opens a window of its own.
                while True:
                    if not self._pending:
                        self._changed.wait()
                        continue
                    due = self._opened + settings.AIQUEUE_LIVE_LIST_INTERVAL_MS / 1000
                    delay = due - time.monotonic()
                    if delay <= 0:
                        break
                    self._changed.wait(delay)
            self.flush()

    def flush(self) -> None:
        """Render and send what is pending now."""
        with self._changed:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            sent = live.send(render_frames(pending))
        except Exception:
            log.warning("live: list frames failed", exc_info=True)
            sent = False
        finally:
            if threading.current_thread() is not threading.main_thread():
                connection.close()  # this thread's own; pooled ones go back to the pool
        if not sent:
            # Rendered afresh next time: a lost frame must not leave a list on an old state.
            with self._changed:
                for pk, (created, groups) in pending.items():
                    self._note(pk, created, groups)


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
