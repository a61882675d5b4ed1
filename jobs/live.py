"""Live progress: render the partials a page shows and push them to websocket groups.

Push is best effort; state is pull (DESIGN decision 7). A message that never arrives costs a
page nothing: on every (re)connect the page re-fetches its live region over HTTP, so this
module never retries and never lets a publishing failure touch the job.

Groups (consumers in jobs/consumers.py join them):

- ``job-<code>``: the detail page of one job. Messages ``job.update`` carry the page's live
  partials rendered out-of-band (``html``), the cancel form in two variants (``actions``: for
  viewers who may change the job and for the rest; the consumer picks one per connection), or
  only the output streamed so far (``job.output``).
- ``jobs-all`` (viewers with ``jobs.view_job``) and ``jobs-user-<pk>`` (everyone else, own jobs
  only): the job list and the dashboard. Messages ``jobs.update`` carry ``parts``, a dict of
  name → out-of-band HTML; a connection asks for the parts its page shows (``?parts=row,counters``)
  so no page receives fragments it has no target for. To make another page region live, add a
  renderer to ``LIST_PARTS`` and the part name to that page's ``ws-connect`` URL. Part ``new``
  (only when a job is created) tells the list page to re-fetch its table.

Everything is rendered once per publish in the publishing process (worker or web), from the same
``{% partialdef %}`` the page renders on first load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from channels.layers import get_channel_layer
from django.db.models import Count, QuerySet
from django.template.loader import render_to_string

from jobs import queueing
from jobs.models import Job

log = logging.getLogger(__name__)

# Seconds to wait for the channel layer before giving up on one publish.
SEND_TIMEOUT = 2.0
# Minimum seconds between two publishes of a streaming output; the last state always goes out.
STREAM_INTERVAL = 0.1

ALL_JOBS_GROUP = "jobs-all"


def job_group(code: Any) -> str:
    return f"job-{code}"


def user_group(user_pk: int) -> str:
    return f"jobs-user-{user_pk}"


def list_group_for(user) -> str:
    """The list/dashboard group a viewer joins: everything for operators, else their own."""
    return ALL_JOBS_GROUP if user.has_perm("jobs.view_job") else user_group(user.pk)


# --------------------------------------------------------------------------- sending


class _LoopThread:
    """One event loop per process, on a daemon thread, for every publish of that process.

    `async_to_sync(group_send)` builds a new event loop and a new Redis connection per call
    (~75% of a 4.5 ms publish, FIELD-NOTES); a long-lived loop keeps channels-redis's pooled
    connection warm. Callers wait for their send, so one caller's messages stay in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            # A forked child inherits the object but not the thread: start a new one.
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="live-publish", daemon=True).start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop


_loop_thread = _LoopThread()


def send(messages: list[tuple[str, dict[str, Any]]]) -> bool:
    """group_send each (group, message) in order. Returns False (and logs) on failure."""
    layer = get_channel_layer()
    if layer is None or not messages:
        return False

    async def send_all() -> None:
        for group, message in messages:
            await layer.group_send(group, message)

    future = asyncio.run_coroutine_threadsafe(send_all(), _loop_thread.loop())
    try:
        future.result(timeout=SEND_TIMEOUT)
    except Exception:
        future.cancel()
        log.warning("live publish to %s failed", [g for g, _ in messages], exc_info=True)
        return False
    return True


def listened(groups: list[str]) -> set[str]:
    """The groups that have at least one websocket in them right now.

    Rendering is most of a publish's cost (queries + templates), and most state changes happen
    with nobody watching: asking Redis first makes an unwatched job cost one round trip.
    channels-redis keeps each group as a sorted set of channel names scored by join time.
    """
    layer = get_channel_layer()
    if layer is None or not groups:
        return set()
    if not hasattr(layer, "_group_key"):  # not channels-redis (e.g. the in-memory layer)
        return set(groups)
    cutoff = int(time.time()) - layer.group_expiry
    try:
        with queueing.connection().pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.zcount(layer._group_key(group), cutoff, "+inf")
            counts = pipe.execute()
    except Exception:
        log.warning("live: could not read group membership; publishing anyway", exc_info=True)
        return set(groups)
    return {group for group, count in zip(groups, counts, strict=True) if count}


# --------------------------------------------------------------------------- rendering


def _job_for_render(job_pk: int) -> Job | None:
    return Job.objects.select_related("workload", "submitted_by").filter(pk=job_pk).first()


def render_job_update(job: Job) -> dict[str, Any]:
    """The detail page's live partials, out-of-band, as one ``job.update`` message."""
    context = {
        "job": job,
        "attempts": job.attempts.select_related("provider"),
        "events": job.events.select_related("actor"),
        "oob": True,
    }
    html = render_to_string("jobs/detail.html#job-oob", context)
    actions = {
        variant: render_to_string(
            "jobs/detail.html#job-actions", {**context, "can_change": variant == "change"}
        )
        for variant in ("change", "view")
    }
    return {"type": "job.update", "html": html, "actions": actions}


def render_output(job: Job, text: str, *, streaming: bool = True) -> dict[str, Any]:
    """Only the output card, with the text streamed so far (autoescaped like any output)."""
    html = render_to_string(
        "jobs/detail.html#job-output",
        {"job": job, "streamed_text": text, "is_streaming": streaming, "oob": True},
    )
    return {"type": "job.output", "html": html}


def render_row(job: Job, jobs: QuerySet[Job]) -> str:
    return render_to_string("jobs/list.html#job-row", {"job": job, "oob": True})


def render_counters(job: Job, jobs: QuerySet[Job]) -> str:
    counts = dict(jobs.order_by().values_list("status").annotate(n=Count("id")))
    return render_to_string(
        "jobs/dashboard.html#job-counters",
        {"counts": status_counts(counts), "oob": True},
    )


def status_counts(counts: dict[str, int]) -> list[tuple[str, str, int]]:
    return [(value, label, counts.get(value, 0)) for value, label in Job.Status.choices]


# name → renderer(job, jobs visible to the group) -> out-of-band HTML.
LIST_PARTS: dict[str, Callable[[Job, QuerySet[Job]], str]] = {
    "row": render_row,
    "counters": render_counters,
}


def list_groups(job: Job) -> list[tuple[str, QuerySet[Job]]]:
    """The list groups that see `job`, each with the jobs that group may see."""
    groups = [(ALL_JOBS_GROUP, Job.objects.all())]
    if job.submitted_by_id is not None:
        groups.append(
            (user_group(job.submitted_by_id), Job.objects.filter(submitted_by=job.submitted_by_id))
        )
    return groups


# A part sent only when a job is created: the list page re-fetches its table (debounced, in
# static/js/live.js), since filters and pagination decide whether and where a new row belongs.
NEW_JOB_PART = "new"


def render_list_updates(
    job: Job, *, created: bool = False, only: set[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    messages = []
    new_marker = render_to_string("jobs/list.html#job-list-new", {"oob": True}) if created else None
    for group, jobs in list_groups(job):
        if only is not None and group not in only:
            continue
        parts = {name: render(job, jobs) for name, render in LIST_PARTS.items()}
        if new_marker is not None:
            parts[NEW_JOB_PART] = new_marker
        messages.append((group, {"type": "jobs.update", "parts": parts}))
    return messages


# --------------------------------------------------------------------------- publishing


def _groups(job: Job) -> list[str]:
    """Every group that shows `job`: its own page, then the lists that see it."""
    return [job_group(job.code), *(group for group, _ in list_groups(job))]


def publish_job(
    job_pk: int,
    *,
    created: bool = False,
    code: str | None = None,
    submitted_by_id: int | None = None,
) -> bool:
    """Render and push the current state of a job to its page and to the list/dashboard.

    Called on commit (jobs.services registers it), so what it reads is what was committed.
    Given the job's `code` and `submitted_by_id`, it asks Redis whether anyone watches before
    reading the database: an unwatched job (most of them, in a burst) costs one round trip.
    Never raises: a failed publish must not fail the state change that triggered it.
    """
    try:
        watched: set[str] | None = None
        if code is not None:
            watched = listened(_groups(Job(pk=job_pk, code=code, submitted_by_id=submitted_by_id)))
            if not watched:
                return True
        job = _job_for_render(job_pk)
        if job is None:
            return False
        if watched is None:
            watched = listened(_groups(job))
            if not watched:
                return True
        sent = True
        if job_group(job.code) in watched:
            # The job's own page first: it should not wait for the list and counters to render.
            sent = send([(job_group(job.code), render_job_update(job))])
        updates = render_list_updates(job, created=created, only=watched)
        return (send(updates) if updates else True) and sent
    except Exception:
        log.warning("live render of job pk=%s failed", job_pk, exc_info=True)
        return False


class OutputStream:
    """The `on_delta` callback of one run: collects streamed text and publishes the text so
    far to the job's page at most every `interval` s (the first chunk at once). `close()` sends
    the final state, so the last tokens are never held back by the throttle.

    The whole text is sent each time, not the delta: a page that missed a message is whole
    again with the next one.
    """

    def __init__(
        self,
        job: Job,
        *,
        interval: float = STREAM_INTERVAL,
        on_first: Callable[[], None] | None = None,
        before: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        # Called before each chunk is taken: may raise to cut the call (jobs.runner.RunStop).
        self.before = before
        self.interval = interval
        self.on_first = on_first
        self.clock = clock
        self.parts: list[str] = []
        self.attempt: int | None = None
        self.last_sent: float | None = None
        self.dirty = False
        self.published = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def __call__(self, delta: str) -> None:
        if self.before is not None:
            self.before()
        if not delta:
            return
        if self.job.attempt_count != self.attempt:
            # The first chunk of this attempt: a retried call streams its answer from the start.
            self.attempt = self.job.attempt_count
            self.parts = []
            if self.on_first is not None:
                self.on_first()
        self.parts.append(delta)
        self.dirty = True
        now = self.clock()
        if self.last_sent is None or now - self.last_sent >= self.interval:
            self._publish(now)

    def close(self) -> None:
        if self.dirty:
            self._publish(self.clock(), streaming=False)

    def _publish(self, now: float, *, streaming: bool = True) -> None:
        self.last_sent = now
        self.dirty = False
        if not listened([job_group(self.job.code)]):
            return
        try:
            message = render_output(self.job, self.text, streaming=streaming)
        except Exception:
            log.warning("live render of streamed output failed", exc_info=True)
            return
        if send([(job_group(self.job.code), message)]):
            self.published += 1
