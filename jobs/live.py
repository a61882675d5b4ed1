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
  only): the job list and the dashboard. Messages ``jobs.update`` carry ``items``, one per job
  that changed since the group's last frame (jobs.live_batch coalesces them), each a dict of
  name → out-of-band HTML; a connection asks for the parts its page shows (``?parts=row,counters``)
  so no page receives fragments it has no target for. To make another page region live, add a
  renderer to ``LIST_PARTS`` and the part name to that page's ``ws-connect`` URL. Part ``new``
  (only when a job is created) tells the list page to re-fetch its table.
- ``batch-<pk>`` (the batch's page, for users who may see the batch; batches/consumers.py) and
  ``review-inbox`` (the inbox, for reviewers; review/consumers.py): messages ``live.stale`` say
  only that the page's live region changed (``STALE_HTML``); the page re-fetches it, at most
  once a second. A batch of thousands of rows or an inbox of hundreds of items changes too
  often, and is too costly to render, to push its HTML on every change.

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

import redis
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Count, QuerySet
from django.template.loader import render_to_string

from jobs import kinds, timeline
from jobs.models import Attempt, Job, JobEvent, Provider

log = logging.getLogger(__name__)

# The list pages' coalescing batcher: jobs.live_batch registers itself here when imported
# (jobs.apps imports it in every process), so this module needs no import of it.
list_batcher = None

# Seconds to wait for the channel layer before giving up on one publish.
SEND_TIMEOUT = 2.0
# Minimum seconds between two publishes of a streaming output; the last state always goes out.
STREAM_INTERVAL = 0.1

ALL_JOBS_GROUP = "jobs-all"


def job_group(code: Any) -> str:
    return f"job-{code}"


def user_group(user_pk: int) -> str:
    return f"jobs-user-{user_pk}"


REVIEW_GROUP = "review-inbox"


def batch_group(batch_pk: int) -> str:
    return f"batch-{batch_pk}"


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


def publishing_loop() -> asyncio.AbstractEventLoop:
    """The process's one loop for publishes (jobs.live_batch sends its frames on it too)."""
    return _loop_thread.loop()


def send(
    messages: list[tuple[str, dict[str, Any]]],
    watchers: dict[str, list[str] | None] | None = None,
) -> bool:
    """group_send each (group, message) in order. Returns False (and logs) on failure.

    Given `watchers` (from `members`) that name every group's channels, the messages go out
    from this thread, one Redis round trip each (`_send_direct`); otherwise through the
    channel layer's group_send on the process's publishing loop (four round trips and two
    thread hand-offs, each a wait for the GIL in a busy worker).
    """
    layer = get_channel_layer()
    if layer is None or not messages:
        return False
    if watchers is not None and all(watchers.get(group) for group, _ in messages):
        try:
            for group, message in messages:
                _send_direct(layer, watchers[group], message)
        except Exception:
            log.warning("live publish to %s failed", [g for g, _ in messages], exc_info=True)
            return False
        return True

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


# channels-redis's group_send as one script, given the group's channels: for each process
# inbox, drop the expired messages, then add this one unless the inbox is at capacity.
_GROUP_SEND_LUA = """
local now = tonumber(ARGV[#ARGV - 1])
local expiry = tonumber(ARGV[#ARGV])
for i = 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, math.floor(now) - expiry)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], now, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    end
end
return 0
"""

_clients: dict[tuple[int, str], tuple[redis.Redis, Any]] = {}
_clients_lock = threading.Lock()


def _layer_client(layer) -> tuple[redis.Redis, Any] | None:
    """A synchronous client of the channel layer's Redis and the send script on it (one per
    process), or None for a layer other than channels-redis on one Redis (a sharded layer
    keeps its own path)."""
    hosts = getattr(layer, "hosts", None)
    if not hasattr(layer, "_group_key") or not hosts or len(hosts) != 1:
        return None
    address = hosts[0].get("address") if isinstance(hosts[0], dict) else None
    if not isinstance(address, str):
        return None
    key = (os.getpid(), address)
    with _clients_lock:
        if key not in _clients:
            client = redis.Redis.from_url(address, socket_keepalive=True)
            _clients[key] = (client, client.register_script(_GROUP_SEND_LUA))
        return _clients[key]


def _send_direct(layer, channels: list[str], message: dict[str, Any]) -> None:
    """What channels-redis's group_send does once it has read the group's channels: one copy
    of the message per process inbox, naming that process's channels, serialized by the
    layer itself, so its consumers read it as any other."""
    client, script = _layer_client(layer)
    by_connection, message_for, capacity_for = layer._map_channel_keys_to_connection(
        channels, message
    )
    keys = [key for keys in by_connection.values() for key in keys]
    args = [message_for[key] for key in keys] + [capacity_for[key] for key in keys]
    script(keys=keys, args=[*args, time.time(), int(layer.expiry)], client=client)


# A group found empty is taken as empty for AIQUEUE_LIVE_UNWATCHED_CACHE_MS without asking
# Redis again: most state changes happen with nobody watching, and asking was a Redis round
# trip per publish, six per job (PERF-NOTES; on the worker's call loop each one holds every
# run). A page that joins meanwhile is not told of what changes in that time, so its socket's
# opening re-fetches its regions twice: at once, and again 1.5 s later (static/js/live.js,
# RECHECK_MS; the setting is at most 1000, and tests/jobs/test_live.py keeps the two in step).
_unwatched: dict[str, float] = {}  # group -> monotonic time until which it counts as empty
_UNWATCHED_MAX = 20_000


def _note_unwatched(groups: list[str], until: float) -> None:
    if len(_unwatched) > _UNWATCHED_MAX:
        now = time.monotonic()
        for group in [g for g, t in _unwatched.items() if t <= now]:
            _unwatched.pop(group, None)
    for group in groups:
        _unwatched[group] = until


def forget_unwatched() -> None:
    _unwatched.clear()


def members(groups: list[str]) -> dict[str, list[str] | None]:
    """The groups that have at least one websocket in them right now, each with its channels
    (None where they cannot be read: a layer other than channels-redis, or Redis failing; then
    every group counts as watched and `send` takes the layer's own path).

    Rendering is most of a publish's cost (queries + templates), and most state changes happen
    with nobody watching: asking Redis first makes an unwatched job cost one round trip, and
    one found unwatched costs none for AIQUEUE_LIVE_UNWATCHED_CACHE_MS after.
    channels-redis keeps each group as a sorted set of channel names scored by join time.
    """
    layer = get_channel_layer()
    if layer is None or not groups:
        return {}
    found = _layer_client(layer)
    if found is None:
        return dict.fromkeys(groups)
    now = time.monotonic()
    asked = [group for group in groups if _unwatched.get(group, 0.0) <= now]
    if not asked:
        return {}
    cutoff = int(time.time()) - layer.group_expiry
    try:
        with found[0].pipeline(transaction=False) as pipe:
            for group in asked:
                pipe.zrangebyscore(layer._group_key(group), cutoff, "+inf")
            channels = pipe.execute()
    except Exception:
        log.warning("live: could not read group membership; publishing anyway", exc_info=True)
        return dict.fromkeys(groups)
    watched = {
        group: [name.decode() for name in names]
        for group, names in zip(asked, channels, strict=True)
        if names
    }
    cache_s = settings.AIQUEUE_LIVE_UNWATCHED_CACHE_MS / 1000
    if cache_s > 0:
        _note_unwatched([g for g in asked if g not in watched], now + cache_s)
    return watched


def listened(groups: list[str]) -> set[str]:
    """The groups that have at least one websocket in them right now (see `members`)."""
    return set(members(groups))


# The whole of a `live.stale` message: swapped out-of-band onto the page's own marker, which
# static/js/live.js takes as "re-fetch the live regions" (at most once a second).
STALE_HTML = '<span id="live-stale" data-live-stale hidden hx-swap-oob="true"></span>'
STALE_MESSAGE = {"type": "live.stale", "html": STALE_HTML}


def stale_on_commit(group: str) -> None:
    """Tell the pages in `group` that their live region changed, once the current transaction
    commits (at once outside one). Many calls in one transaction send one message: a
    callback already registered for the group is found in Django's on-commit list (which a
    rollback empties). Never raises, like every publish."""
    registered = transaction.get_connection().run_on_commit
    if any(getattr(entry[1], "stale_group", None) == group for entry in registered):
        return

    def send_stale() -> None:
        try:
            if listened([group]):
                send([(group, STALE_MESSAGE)])
        except Exception:
            log.warning("live: stale notice to %s failed", group, exc_info=True)

    send_stale.stale_group = group  # type: ignore[attr-defined]
    transaction.on_commit(send_stale)


# --------------------------------------------------------------------------- rendering


# What the job's partials show of other rows; neither changes while a job runs.
RENDER_RELATED = ("workload", "submitted_by")

# The reads of every publish to a job page, in plain SQL that runs unchanged on SQLite and
# PostgreSQL. The ORM compiles each query anew: ~1 ms apiece on these machines, four or five
# times the query itself, and a publish makes three (bench/live.py). tests/jobs/test_live.py
# checks that they return what the ORM's querysets do. Only table and column names from the
# models' metadata are formatted in (hence the noqa); values are always parameters.
_JOB_SQL = f"SELECT * FROM {Job._meta.db_table} WHERE id = %s"  # noqa: S608
_USERNAME = get_user_model()._meta.get_field(get_user_model().USERNAME_FIELD).column
_EVENTS_SQL = (
    f"SELECT e.*, u.{_USERNAME} AS actor_name FROM {JobEvent._meta.db_table} e "  # noqa: S608
    f"LEFT OUTER JOIN {get_user_model()._meta.db_table} u ON u.id = e.actor_id "
    "WHERE e.job_id = %s ORDER BY e.created_at, e.id"
)
_ATTEMPTS_SQL = (
    f"SELECT a.*, p.name AS provider_name FROM {Attempt._meta.db_table} a "  # noqa: S608
    f"INNER JOIN {Provider._meta.db_table} p ON p.id = a.provider_id "
    "WHERE a.job_id = %s ORDER BY a.number, a.id"
)


def job_history(job: Job) -> list[JobEvent]:
    """The job's events, oldest first, each with `actor_name` (the ORM's `job.events`)."""
    return list(JobEvent.objects.raw(_EVENTS_SQL, [job.pk]))


def job_ledger(job: Job) -> list[Attempt]:
    """The job's attempts by number, each with `provider_name` (the ORM's `job.attempts`).
    No query for a job that has made no call yet."""
    return list(Attempt.objects.raw(_ATTEMPTS_SQL, [job.pk])) if job.attempt_count else []


def _job_for_render(job_pk: int, like: Job | None = None) -> Job | None:
    """The job's row as committed, with its workload and submitter: taken from `like` (the
    caller's copy of the same job) where it has them loaded, else joined in."""
    reuse = [
        name
        for name in RENDER_RELATED
        if like is not None and Job._meta.get_field(name).is_cached(like)
    ]
    joined = [name for name in RENDER_RELATED if name not in reuse]
    if joined:
        try:
            job = Job.objects.select_related(*joined).get(pk=job_pk)  # first() adds ORDER BY
        except Job.DoesNotExist:
            return None
    else:
        job = next(iter(Job.objects.raw(_JOB_SQL, [job_pk])), None)
        if job is None:
            return None
    for name in reuse:
        setattr(job, name, getattr(like, name))
    return job


def render_job_update(job: Job) -> dict[str, Any]:
    """The detail page's live partials, out-of-band, as one ``job.update`` message."""
    attempts, events = job_ledger(job), job_history(job)
    context = {
        "job": job,
        "attempts": attempts,
        "events": events,
        "timeline": timeline.build(events, attempts),
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
# Parts that show the whole list, not the job's row: one per frame (jobs.live_batch).
WHOLE_LIST_PARTS = ("counters",)


def list_groups(job: Job) -> list[tuple[str, Callable[[], QuerySet[Job]]]]:
    """The list groups that see `job`, each with a function giving the jobs that group may
    see (built only for a group that is rendered for: most publishes need just the names).

    A document's chunks are in no list and no counter (`listed_jobs`): they show on their
    document's page, so a chunk's update goes to its own page only."""
    if job.parent_id is not None:
        return []
    groups: list[tuple[str, Callable[[], QuerySet[Job]]]] = [
        (ALL_JOBS_GROUP, lambda: listed_jobs(Job.objects.all()))
    ]
    owner = job.submitted_by_id
    if owner is not None:
        groups.append(
            (user_group(owner), lambda: listed_jobs(Job.objects.filter(submitted_by=owner)))
        )
    return groups


def listed_jobs(jobs: QuerySet[Job]) -> QuerySet[Job]:
    """What the job list, the dashboard's counters and its recent jobs show: what people
    submitted. A document's chunks are listed on the document's page instead (and counted as
    calls by the health panel)."""
    return jobs.filter(parent__isnull=True)


# A part sent only when a job is created: the list page re-fetches its table (debounced, in
# static/js/live.js), since filters and pagination decide whether and where a new row belongs.
NEW_JOB_PART = "new"


def render_list_updates(
    job: Job, *, created: bool = False, only: set[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    messages = []
    new_marker = render_to_string("jobs/list.html#job-list-new", {"oob": True}) if created else None
    for group, visible in list_groups(job):
        if only is not None and group not in only:
            continue
        jobs = visible()
        parts = {name: render(job, jobs) for name, render in LIST_PARTS.items()}
        if new_marker is not None:
            parts[NEW_JOB_PART] = new_marker
        messages.append((group, {"type": "jobs.update", "parts": parts}))
    return messages


# --------------------------------------------------------------------------- publishing


def _groups(job: Job, *, created: bool = False) -> list[str]:
    """Every group that shows `job`: its own page, the lists that see it, its batch's page.
    Not the job's own page when it was just created: its code is known to nobody until the
    transaction that made it has committed and answered, so no page of it can be open yet
    (and with the lists' groups found unwatched a moment ago, such a publish asks Redis
    nothing)."""
    own = [] if created else [job_group(job.code)]
    groups = [*own, *(group for group, _ in list_groups(job))]
    if job.batch_id is not None:
        groups.append(batch_group(job.batch_id))
    return groups


def publish_job(job_or_pk: Job | int, *, created: bool = False) -> bool:
    """Render and push the current state of a job to its page and to the list/dashboard.

    Called on commit (jobs.services registers it with the Job it changed). The job's row is
    always read again, so what is rendered is what was committed; the caller's Job tells,
    before any query, whether anyone watches (its code and owner name the groups: an
    unwatched job, most of them in a burst, costs one Redis round trip), and lends its
    already-loaded workload and submitter. Never raises: a failed publish must not fail the
    state change that triggered it.
    """
    known = job_or_pk if isinstance(job_or_pk, Job) else None
    job_pk = known.pk if known is not None else job_or_pk
    try:
        watched: dict[str, list[str] | None] | None = None
        if known is not None:
            watched = members(_groups(known, created=created))
            if not watched:
                return True
        job = _job_for_render(job_pk, like=known)
        if job is None:
            return False
        if watched is None:
            watched = members(_groups(job, created=created))
            if not watched:
                return True
        sent = True
        if job_group(job.code) in watched:
            # The job's own page first: it should not wait for the list and counters to render.
            sent = send([(job_group(job.code), render_job_update(job))], watched)
        # The list pages get their rows coalesced: one frame per group per short interval
        # (jobs.live_batch), each changed row as it is when the frame is made.
        lists = [group for group, _ in list_groups(job) if group in watched]
        if lists and list_batcher is not None:
            list_batcher.add(job, lists, created=created)
        if job.batch_id is not None and batch_group(job.batch_id) in watched:
            sent = send([(batch_group(job.batch_id), STALE_MESSAGE)], watched) and sent
        return sent
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
        # Called before each chunk is taken: may raise to cut the call (runs.runner.RunStop).
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
        watched = members([job_group(self.job.code)])
        if not watched:
            return
        try:
            text = kinds.without_rating(self.job.workload, self.text)
            message = render_output(self.job, text, streaming=streaming)
        except Exception:
            log.warning("live render of streamed output failed", exc_info=True)
            return
        if send([(job_group(self.job.code), message)], watched):
            self.published += 1
