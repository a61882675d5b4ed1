"""The Redis side of a job: its RQ entry, with a deterministic id (`job-<code>`).

Redis is a cache of "what to run next", rebuilt from the database by the reconciler. So an
enqueue that fails (Redis down, restarted, wiped) is logged, not raised: the job row already
says queued and the reconciler will enqueue it again.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
from collections.abc import Container, Iterable
from datetime import datetime, timedelta

import django_rq
import redis
import rq
from django.conf import settings
from django.db import transaction
from rq import get_current_job
from rq.job import Job as RQJob
from rq.job import JobStatus

from jobs import fairshare
from jobs.models import Job

log = logging.getLogger(__name__)

TASK = "runs.tasks.run_job"
# RQ's own timeout is a last resort above the workload's timeout: the provider call has its
# own, shorter, read timeout and the runner finishes the job itself.
RQ_TIMEOUT_MARGIN_S = 30
# RQ states in which the job will still be picked up without our help.
LIVE_RQ_STATES = frozenset(
    {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
)


_client: tuple[tuple[int, str], redis.Redis] | None = None
_client_lock = threading.Lock()


def connection() -> redis.Redis:
    """This process's Redis client, shared by its threads (redis-py's pool is thread-safe).

    `django_rq.get_connection()` builds a new client, and so opens a new TCP connection, on
    every call; at several Redis round trips per job that was most of a worker's Redis time.
    A forked child (RQ's scheduler) or a changed RQ_QUEUES URL gets a new one.
    """
    global _client
    key = (os.getpid(), str(settings.RQ_QUEUES["default"].get("URL")))
    with _client_lock:
        if _client is None or _client[0] != key:
            _client = (key, django_rq.get_connection("default"))
        return _client[1]


def allow_connections(client: redis.Redis, count: int) -> None:
    """Let `client`'s pool open up to `count` connections at once. redis-py refuses the 101st
    by default (MaxConnectionsError), which a threaded worker with 50 or more threads can
    reach: a job thread may hold two at a time (RQ reads the job's status inside its success
    transaction)."""
    pool = client.connection_pool
    pool.max_connections = max(pool.max_connections, count)


def queue(name: str) -> rq.Queue:
    """The RQ queue `name` (high, default, low) on this process's shared client."""
    return django_rq.get_queue(name, connection=connection())


def enqueue(job: Job) -> bool:
    return _enqueue(job, at=None)


def enqueue_at(job: Job, when: datetime) -> bool:
    """Schedule the job's run for `when` (RQ's scheduler moves it onto its queue then)."""
    return _enqueue(job, at=when)


def _not_before(when: datetime) -> datetime:
    """`when`, rounded up to a whole second.

    RQ's scheduled registry keeps whole seconds, rounded down, so its scheduler would move a
    job due at 08:08:41.6 onto its queue at 08:08:41.0. The runner finds that job not due yet
    and drops the entry (a stray duplicate looks the same), and only the reconciler brought it
    back, a reconcile interval later. Rounded up, it is never early, and at most a second late.
    """
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when


# Enqueues held back until the RQ job that asked for them has been cleaned up (see _enqueue):
# per run (a context variable is per thread and per greenlet on the call loop).
_held: contextvars.ContextVar[list | None] = contextvars.ContextVar("held_enqueues", default=None)


def _enqueue(job: Job, *, at: datetime | None) -> bool:
    current = get_current_job()
    if current is not None and current.id == job.rq_job_id:
        # A run re-scheduling its own job (parked: Retry-After, open breaker, retry budget).
        # Its RQ entry has the same id and RQ deletes that entry's hash once the run returns
        # (result_ttl 0), which would take the new schedule with it. The worker makes the
        # enqueue after RQ's cleanup (runs.worker.Worker.perform_job -> run_held_enqueues).
        held = _held.get()
        if held is None:
            held = []
            _held.set(held)
        held.append((job, at))
        return True
    options = {  # as RQ's create_job and enqueue_call name them
        "job_id": job.rq_job_id,
        "timeout": job.workload.timeout_s + RQ_TIMEOUT_MARGIN_S,
        "result_ttl": 0,
        "failure_ttl": 24 * 3600,
        "description": f"{job.workload.name} {job.code}",
    }
    if settings.AIQUEUE_FAIR_SHARE:
        options["meta"] = {fairshare.LANE_META: fairshare.lane_of(job)}
    if at is not None:
        try:  # what RQ's enqueue_at does, with these options' names (one MULTI)
            rq_queue = queue(job.priority)
            rq_job = rq_queue.create_job(
                TASK, args=(str(job.code),), status=JobStatus.SCHEDULED, **options
            )
            rq_queue.schedule_job(rq_job, _not_before(at))
        except redis.RedisError as exc:
            log.warning("job=%s enqueue failed, the reconciler will retry: %s", job.code, exc)
            return False
        return True
    if transaction.get_connection().in_atomic_block:
        # What django-rq's "on_db_commit" mode does for an enqueue, which _push goes around:
        # a job goes on its queue only once its row is committed.
        transaction.on_commit(lambda: _push(job, options))
        return True
    return _push(job, options)


def _push(job: Job, options: dict) -> bool:
    """Put the job on its queue in one MULTI: RQ's queue registration, the job's hash and the
    push (RQ on its own sends the registration in a round trip of its own). RQ's
    `enqueue_call` is called as `rq.Queue` defines it, so that django-rq's deferral to the
    commit (see _enqueue) cannot take the pipeline's commands past its execute()."""
    try:
        rq_queue = queue(job.priority)
        with rq_queue.connection.pipeline() as pipe:
            rq.Queue.enqueue_call(rq_queue, TASK, (str(job.code),), pipeline=pipe, **options)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("job=%s enqueue failed, the reconciler will retry: %s", job.code, exc)
        return False
    return True


def _worker_is_gone(hostname: bytes | None, pid: bytes | None) -> bool:
    """From an RQ worker's registration (its hostname and pid fields): gone when the
    registration has expired (a dead worker's lapses within its TTL, on any host), or names a
    process of this host that no longer exists. A live pid is taken as the worker: a reused
    pid only delays the verdict until the registration lapses."""
    if hostname is None and pid is None:
        return True
    if hostname is None or hostname.decode() != socket.gethostname():
        return False
    try:
        number = int(pid or b"0")
    except ValueError:
        return False
    if number <= 0:
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def enqueue_recovered(job: Job) -> bool:
    """Enqueue a job whose run was recovered (its worker died, stalled or stopped), after
    dropping that run's executions from RQ's started registry. Left there, RQ's maintenance
    would find them expired a minute or so later and mark the job's entry, queued or running
    again by then, failed ("AbandonedJobError"): a false alarm, and a wrong status in Redis."""
    try:
        conn = connection()
        key = queue(job.priority).started_job_registry.key
        prefix = f"{job.rq_job_id}:".encode()
        stale = [m for m in conn.zrange(key, 0, -1) if m.startswith(prefix)]
        if stale:
            conn.zrem(key, *stale)
    except redis.RedisError as exc:
        log.warning("job=%s could not drop its old RQ executions: %s", job.code, exc)
    return enqueue(job)


def run_held_enqueues() -> None:
    """Make the enqueues that runs held back for their own job (see _enqueue)."""
    items = _held.get() or []
    _held.set(None)
    for job, at in items:
        _enqueue(job, at=at)


def remove(job: Job) -> None:
    """Drop a job's RQ entry if it is still waiting (cancelled, expired, woken early).

    Taking the id off its queue (LREM) or the scheduler's registry (ZREM) is atomic, so either
    this call or a worker gets it. An entry a worker has already taken is left alone, even if
    it still reads "queued" (popped, not started yet): the run re-reads the job and returns,
    or sees the new status at its next heartbeat, and RQ cleans the entry up after it. RQ's
    `Job.cancel()` is not used: it re-reads the status, so it raised InvalidJobOperation when
    the worker had meanwhile finished the job and deleted its entry (result_ttl 0), and it
    deleted the entry of a run in progress from under the worker.
    """
    conn = connection()
    try:
        rq_job = RQJob.fetch(job.rq_job_id, connection=conn)
    except Exception:  # noqa: BLE001 - missing or unreadable: nothing to remove
        return
    try:
        rq_queue = rq.Queue(rq_job.origin, connection=conn)
        with conn.pipeline() as pipe:
            pipe.lrem(rq_queue.key, 0, rq_job.id)
            pipe.zrem(rq_queue.scheduled_job_registry.key, rq_job.id)
            fairshare.forget(pipe, rq_queue.key, rq_job.id)
            taken = sum(pipe.execute()[:2])
        if taken:
            conn.delete(rq_job.key)
    except redis.RedisError as exc:
        log.warning("job=%s could not remove RQ entry: %s", job.code, exc)


def missing_rq_jobs(jobs: Iterable[Job], *, search: Container[int] = ()) -> list[Job]:
    """The jobs whose RQ entry is gone or finished, i.e. nothing will ever run them.

    An entry that says "queued" but is on no queue is gone too: a worker popped it and died
    before starting it (seen after worker kills, for fresh jobs and for the re-queued entries
    of recovered runs), and nothing would ever run the job. Such entries are looked for on
    their queue for every job that has run before (`run_by` set) and for the jobs whose pk is in
    `search` (the reconciler names the oldest queued jobs of each priority: a lost pop was at
    the head of its queue, older than what is still on it, and LPOS finds an entry near the
    head at once, where searching a whole long backlog for each job would not be cheap).
    Status and queue are read in one MULTI, so an entry a worker pops meanwhile is not taken
    for one (a worker that popped it and has not started it yet is the one window left: the
    second entry then finds the job started and returns, runs.runner).

    An entry that says "started" for a job whose row is not running (the caller passes only
    such jobs) is gone as well once the worker that started it is: that worker took it and
    died before the run began, and RQ would give it up only at its started registry's
    cleanup, a quarter of an hour later (`_worker_is_gone`). Re-enqueue those with
    `enqueue_recovered`, which drops the dead execution first.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    conn = connection()
    with conn.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hmget(RQJob.key_for(job.rq_job_id), "status", "origin", "worker_name")
        entries = pipe.execute()
    missing, queued, started = [], [], []
    for job, (status, origin, worker_name) in zip(jobs, entries, strict=True):
        state = status.decode() if isinstance(status, bytes) else status
        if state not in LIVE_RQ_STATES:
            missing.append(job)
        elif state == JobStatus.QUEUED and origin and (job.run_by or job.pk in search):
            queued.append((job, origin.decode() if isinstance(origin, bytes) else origin))
        elif state == JobStatus.STARTED and worker_name:
            started.append((job, worker_name.decode()))
    if started:
        with conn.pipeline(transaction=False) as pipe:
            for _job, worker_name in started:
                pipe.hmget(
                    f"{rq.Worker.redis_worker_namespace_prefix}{worker_name}", "hostname", "pid"
                )
            workers = pipe.execute()
        for (job, worker_name), (hostname, pid) in zip(started, workers, strict=True):
            if _worker_is_gone(hostname, pid):
                log.warning(
                    "job=%s: its RQ entry was started by worker %s, which is gone",
                    job.code,
                    worker_name,
                )
                missing.append(job)
    if queued:
        with conn.pipeline(transaction=True) as pipe:
            for job, origin in queued:
                pipe.hget(RQJob.key_for(job.rq_job_id), "status")
                pipe.lpos(rq.Queue(origin, connection=conn).key, job.rq_job_id)
            answers = pipe.execute()
        for (job, _origin), status, position in zip(
            queued, answers[::2], answers[1::2], strict=True
        ):
            state = status.decode() if isinstance(status, bytes) else status
            if state == JobStatus.QUEUED and position is None:
                log.warning("job=%s: its RQ entry says queued but is on no queue", job.code)
                missing.append(job)
    return missing
