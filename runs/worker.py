"""The aiqueue worker: RQ's worker, many jobs at once in one process, plus the reconciler in
its maintenance pass.

`Worker` runs up to N jobs at once (AIQUEUE_WORKER_CONCURRENCY): an AI call is almost all
waiting, so one process holds hundreds of calls. aiqueue's runs wait on the call loop
(jobs.providers.loop: one thread, a greenlet per run, parked on its provider's socket), not on
a thread each; any other RQ job function runs on a thread of its own, as blocking code may.
`manage.py worker --concurrency N` runs it; so does django-rq's `rqworker --worker-class
runs.worker.Worker` (or `runs.worker.ThreadPoolWorker`, the name earlier releases documented).
The reconciler runs here rather than as a job scheduled in Redis
because it must survive Redis losing its data: a schedule stored in Redis would be lost with it.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import greenlet
import redis
from django.conf import settings
from django.db import close_old_connections, connections
from rq import worker_registration
from rq.command import parse_payload
from rq.exceptions import DequeueTimeout, InvalidJobOperation, StopRequested
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.queue import Queue
from rq.timeouts import BaseDeathPenalty, JobTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from jobs import drain, processes, queueing, services
from jobs.flow.priorities import StarvationGuardMixin
from jobs.models import Job
from jobs.providers import loop
from runs import dbconn, heartbeats, reconcile, runner, shutdown

log = logging.getLogger(__name__)

# RQ's worker blocks on the queues for worker_ttl - 15 s; keep that short so the maintenance
# pass (and with it the reconciler) runs every few seconds even on an idle worker.
WORKER_TTL = 30


class RedisGate:
    """The worker's own Redis calls (its loop, heartbeats, maintenance, RQ's bookkeeping):
    while Redis is away they are skipped and retried with backoff, and the worker goes on.

    RQ's `work()` quits on any exception its loop sees, so a Redis blip while every thread was
    busy ended the worker. Through the gate a failed call is logged once (not once per try),
    tried again after 0.5, 1, 2 … 30 s, and when Redis answers again `on_back` rebuilds what a
    restarted or wiped Redis lost (the worker's registration; the reconciler re-enqueues the
    jobs). The runs in flight go on meanwhile: the database is the source of truth. One gate
    per thread that uses it."""

    FIRST_WAIT_S = 0.5
    MAX_WAIT_S = 30.0

    def __init__(self, worker_name: str, on_back: Callable[[], None] | None = None) -> None:
        self.worker_name = worker_name
        self.on_back = on_back
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._wait = self.FIRST_WAIT_S

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def seconds_to_retry(self) -> float:
        return max(0.0, self._retry_at - time.monotonic()) if self.is_down else 0.0

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run `fn`; False if Redis failed (now, or recently and its retry is not due yet)."""
        if self.is_down and time.monotonic() < self._retry_at:
            return False
        try:
            fn(*args, **kwargs)
        except redis.RedisError as exc:
            self.failed(what, exc)
            return False
        self.succeeded()
        return True

    def failed(self, what: str, exc: Exception) -> None:
        now_s = time.monotonic()
        if self.down_since is None:
            self.down_since = now_s
            self._wait = self.FIRST_WAIT_S
            log.warning(
                "worker %s: Redis unavailable (%s: %s); carrying on, retrying with backoff",
                self.worker_name,
                what,
                exc,
            )
        self._retry_at = now_s + self._wait
        self._wait = min(self._wait * 2, self.MAX_WAIT_S)

    def succeeded(self) -> None:
        if self.down_since is None:
            return
        away = time.monotonic() - self.down_since
        self.down_since = None
        log.warning("worker %s: Redis is back after %.1f s", self.worker_name, away)
        if self.on_back is not None:
            try:
                self.on_back()
            except Exception:
                log.exception(
                    "worker %s: rebuilding after Redis came back failed", self.worker_name
                )


def retry_redis(what: str, fn: Callable[[], Any], worker_name: str, limit_s: float = 60) -> Any:
    """`fn()`, tried again with backoff while Redis fails, for up to `limit_s` s."""
    gate = RedisGate(worker_name)
    deadline = time.monotonic() + limit_s
    while True:
        try:
            result = fn()
        except redis.RedisError as exc:
            if time.monotonic() >= deadline:
                raise
            gate.failed(what, exc)
            loop.sleep(gate.seconds_to_retry())  # a run on the call loop parks
            continue
        gate.succeeded()
        return result


class ThreadDeathPenalty(BaseDeathPenalty):
    """RQ's job timeout for a job in a worker thread: a timer raises the timeout exception in
    that thread (signals only reach the main thread).

    Unlike RQ's TimerDeathPenalty it is safe with many threads at once: the message lives on a
    subclass per penalty instead of a patch of the shared exception class, and a timer that
    fires as the job ends cannot leak its exception into whatever the thread does next (the
    cancel disarms under a lock and clears a pending exception).

    An asynchronous exception is delivered when the thread next runs Python code: a thread
    blocked in one long socket read gets it when the read returns. Provider calls therefore
    carry their own read timeout, below the RQ timeout (jobs.queueing.RQ_TIMEOUT_MARGIN_S).

    A run on the call loop (jobs.providers.loop) gets it where it waits instead: a timer on
    the loop throws it into that run's greenlet, and the other runs on the loop go on.
    """

    def __init__(self, timeout, exception=JobTimeoutException, **kwargs) -> None:
        super().__init__(timeout, exception, **kwargs)
        self._thread_id = threading.get_ident()
        self._call_loop = loop.current()
        self._run = greenlet.getcurrent()
        self._lock = threading.Lock()
        self._armed = False
        self._fired = False
        self._timer: threading.Timer | None = None
        self._loop_timer: int | None = None
        message = f"Task exceeded maximum timeout value ({timeout} seconds)"

        def init(self_exc, *args) -> None:
            exception.__init__(self_exc, message)

        # Named as RQ's class (module and qualname), so a failed job's exc_string reads
        # "rq.timeouts.JobTimeoutException", as under stock RQ, not this module's subclass.
        self._exception = type(
            exception.__name__,
            (exception,),
            {
                "__init__": init,
                "__module__": exception.__module__,
                "__qualname__": exception.__qualname__,
            },
        )

    # The penalty armed in each thread now: RQ's stop-job command ends a job through it.
    _armed_in: dict[int, ThreadDeathPenalty] = {}

    def setup_death_penalty(self) -> None:
        with self._lock:
            self._armed = True
            if self._call_loop is None:
                ThreadDeathPenalty._armed_in[self._thread_id] = self
        if self._timeout <= 0:
            return
        if self._call_loop is not None:
            self._loop_timer = self._call_loop.call_later(self._timeout, self._fire)
            return
        self._timer = threading.Timer(self._timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, exception: type[BaseException] | None = None) -> bool:
        with self._lock:
            if not self._armed:
                return False
            self._armed = False
            self._fired = True
            if self._call_loop is not None:
                self._call_loop.throw(self._run, exception or self._exception)
            else:
                _set_async_exc(self._thread_id, exception or self._exception)
            return True

    @classmethod
    def stop_thread(cls, thread_id: int, exception: type[BaseException]) -> bool:
        """Raise `exception` in the job running on `thread_id`, as a timeout would: only while
        its job function runs, never into what the thread does after it. False if none runs."""
        penalty = cls._armed_in.get(thread_id)
        return penalty is not None and penalty._fire(exception)

    def cancel_death_penalty(self) -> None:
        with self._lock:
            self._armed = False
            if ThreadDeathPenalty._armed_in.get(self._thread_id) is self:
                del ThreadDeathPenalty._armed_in[self._thread_id]
            if self._timer is not None:
                self._timer.cancel()
            if self._call_loop is not None:
                # On the loop's own thread: a fired timer's exception was thrown where the run
                # waited, so it has been raised in it already (the run is running now).
                if self._loop_timer is not None:
                    self._call_loop.cancel(self._loop_timer)
                return
            if self._fired:
                # Fired, but the job ended before the exception was delivered: drop it.
                _set_async_exc(self._thread_id, None)


def _set_async_exc(thread_id: int, exception: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None
    )


class JobStopped(BaseException):
    """Raised in a job's thread by RQ's stop-job command (`rq.command.send_stop_job_command`):
    a BaseException, as a timeout is, so the job's own `except Exception` does not take it."""


@dataclass
class _InFlight:
    job: RQJob
    queue: Queue
    execution: Any = None
    thread_id: int | None = None  # the thread of a plain RQ job (a run on the loop has none)


class Worker(StarvationGuardMixin, SimpleWorker):
    """Runs up to `threads` jobs at once in one process (AIQUEUE_WORKER_CONCURRENCY; the name
    is RQ's and earlier releases'), keeping RQ's guarantees per job.

    - The main thread dequeues (priority order: the queue order, high → default → low) only
      when a slot is free, so no job waits in this process's memory where a crash would
      lose it. It also runs the maintenance pass (RQ registries, scheduler, reconciler).
    - Each job runs with RQ's own bookkeeping: an execution in the queue's
      StartedJobRegistry, the job's timeout (ThreadDeathPenalty), success/failure handling.
      An aiqueue run (`runs.tasks.run_job`) runs on the call loop (jobs.providers.loop): a
      greenlet that parks while its provider answers, so a call in flight holds no thread;
      the runs share the loop thread's database connection. Any other job function gets a
      thread of its own. Database connections are closed (or returned to the pool) when a
      job ends.
    - A monitor thread beats every AIQUEUE_HEARTBEAT_INTERVAL s: one UPDATE refreshes
      `heartbeat_at` of every run in flight (runs.heartbeats) and one Redis pipeline refreshes
      the worker's and every execution's RQ heartbeat.
    - SIGTERM/SIGINT: stop dequeuing, let the jobs in flight finish for up to
      AIQUEUE_WORKER_SHUTDOWN_GRACE s, then hand the rest back (running → queued, re-enqueued)
      and exit. A second signal hands back at once. SIGKILL: nothing runs; the reconciler
      notices the silent heartbeats after AIQUEUE_STALE_RUNNING_AFTER s and re-queues the
      jobs; the fencing token keeps a late finisher from finishing twice.
    - Redis away: the worker's own Redis calls go through a RedisGate and the loop goes on.

    `inline=True` runs each job on the thread that called `work()` instead, one at a time: for a
    caller whose database connection the runs must share, which is the test suite's in-process
    worker inside a test's transaction. Everything else (dequeue, bookkeeping, the monitor's
    beats, stopping) is the same code.
    """

    death_penalty_class = ThreadDeathPenalty

    def __init__(
        self,
        *args,
        threads: int | None = None,
        shutdown_grace: int | None = None,
        inline: bool = False,
        **kwargs,
    ) -> None:
        # Before RQ's __init__, which sets `self.execution` (one per run here: a context
        # variable is per thread and per greenlet).
        self._execution: contextvars.ContextVar = contextvars.ContextVar("execution", default=None)
        self.inline = inline
        self.threads = 1 if inline else threads or settings.AIQUEUE_WORKER_CONCURRENCY
        self.shutdown_grace = (
            settings.AIQUEUE_WORKER_SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace
        )
        self._slots = threading.Semaphore(self.threads)
        self._call_loop: loop.CallLoop | None = None
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._in_flight: dict[str, _InFlight] = {}
        self._stopping: set[str] = set()  # stop-job commands whose job has not ended yet
        self._failure_lock = threading.Lock()  # RQ's _stopped_job_id is one per worker
        self._beats = heartbeats.RunHeartbeats()
        self._monitor_stop = threading.Event()
        self._in_blpop = False
        self._draining = False
        self._cold = False
        self._suspension_checked = -1.0
        self._drain_checked, self._drained = -1.0, False
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", settings.AIQUEUE_RECONCILE_INTERVAL)
        super().__init__(*args, **kwargs)
        self._loop_gate = RedisGate(self.name, on_back=self._redis_back)
        # Two Redis connections per job thread (jobs.queueing.allow_connections), plus the
        # main thread's blocking pop and the monitor's beat; for RQ's client and aiqueue's.
        for client in (self.connection, queueing.connection()):
            queueing.allow_connections(client, 2 * self.threads + 8)

    # RQ keeps "the" current execution on the worker; here there is one per run.
    @property
    def execution(self):
        return self._execution.get()

    @execution.setter
    def execution(self, value) -> None:
        self._execution.set(value)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def serialize(self) -> dict:
        # Beside RQ's fields in the worker's Redis hash, what the workers page shows (ops.fleet):
        # the identity its runs record (Job.run_by) and how many jobs it runs at once.
        return {
            **super().serialize(),
            "aiqueue_identity": processes.identity(),
            "aiqueue_threads": self.threads,
        }

    @property
    def dequeue_timeout(self) -> int:
        # Wake up at least once per reconcile interval so a dead worker's job is noticed fast.
        return max(1, min(self.worker_ttl - 15, settings.AIQUEUE_RECONCILE_INTERVAL))

    # --- Redis away: the loop goes on (RedisGate) ---------------------------------------------
    def register_birth(self) -> None:
        # At start Redis may not answer yet (started beside the worker, failing over): wait
        # for it instead of exiting, so a process manager does not see a crash loop.
        gate = RedisGate(self.name)
        while not gate.call("registering", super().register_birth):
            time.sleep(gate.seconds_to_retry())

    # RQ's loop beats for the worker twice and checks for `rq suspend` once per job it hands
    # out: five Redis round trips on the one thread that hands out every job, which competes
    # with the job threads for the interpreter. The worker's key lives worker_ttl + 60 s and
    # the monitor beats every AIQUEUE_HEARTBEAT_INTERVAL s, so once a second is plenty.
    def heartbeat(self, timeout=None, pipeline=None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)  # the caller executes (and guards) the pipeline
            return
        last = getattr(self, "last_heartbeat", None)
        if timeout is None and last and (now() - last).total_seconds() < 1:
            return
        self._loop_gate.call("worker heartbeat", super().heartbeat, timeout)

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._suspension_checked < 1:
            return
        self._suspension_checked = time.monotonic()
        self._loop_gate.call("suspension check", super().check_for_suspension, burst)

    def set_state(self, state: str, pipeline=None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        self._state = state
        self._loop_gate.call("worker state", super().set_state, state)

    def _redis_back(self) -> None:
        """Redis answers again, maybe empty (restarted without its data, wiped, failed over):
        register this worker again and run the maintenance pass (the reconciler re-enqueues
        what the database says is queued) at the next turn of the loop."""
        with self.connection.pipeline() as pipe:
            self.last_heartbeat = now()
            pipe.hset(self.key, mapping=self.serialize())
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            pipe.execute()
        self.last_cleaned_at = None

    def perform_job(self, job, queue) -> bool:
        # Job boundaries are request boundaries for the database: drop connections that broke
        # or outlived CONN_MAX_AGE, as Django does around each HTTP request.
        close_old_connections()
        try:
            return super().perform_job(job, queue)
        finally:
            # After RQ's cleanup of this entry: a run that parked its own job scheduled its
            # wake-up under the same id (jobs.queueing._enqueue).
            queueing.run_held_enqueues()
            close_old_connections()

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        retry_redis(
            f"preparing {job.id}",
            lambda: super(Worker, self).prepare_job_execution(job, remove_from_intermediate_queue),
            self.name,
        )

    def handle_job_success(self, job, queue, started_job_registry) -> None:
        """RQ's success bookkeeping, unless the entry is no longer this run's: the run was
        superseded (its job recovered and queued again under the same RQ id, whose entry RQ
        would delete), or Redis lost the entry (restarted or wiped while the job ran: RQ then
        raised InvalidJobOperation "Failed to retrieve status" for a job that had succeeded).
        The job's result is in the database either way; only this execution is cleaned up."""
        self._stop_beating(job)  # RQ deletes the execution next
        if getattr(job, "_result", None) != runner.LOST:
            try:
                super().handle_job_success(job, queue, started_job_registry)
                return
            except InvalidJobOperation:
                pass
            except redis.RedisError as exc:
                log.warning(
                    "job %s finished; RQ's bookkeeping skipped, Redis unavailable: %s", job.id, exc
                )
                return
        try:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe)
                pipe.execute()
        except redis.RedisError:
            pass

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="") -> None:
        self._stop_beating(job)
        with self._failure_lock:
            with self._lock:
                stopped = job.id in self._stopping
                self._stopping.discard(job.id)
            # RQ records a job it was told to stop as stopped, not failed (and not retried).
            self._stopped_job_id = job.id if stopped else None
            try:
                super().handle_job_failure(job, queue, started_job_registry, exc_string)
            except (InvalidJobOperation, redis.RedisError) as exc:
                log.warning("job %s: RQ's failure bookkeeping skipped: %s", job.id, exc)
            finally:
                self._stopped_job_id = None

    # --- RQ's commands (`rq.command`): stop-job reaches the job's own thread ----------------
    def handle_payload(self, message) -> None:
        payload = parse_payload(message)
        if payload.get("command") == "stop-job":
            self.stop_job(payload.get("job_id") or "")
            return
        super().handle_payload(message)

    def stop_job(self, job_id: str) -> bool:
        """Stop job `job_id` if this worker runs it. An aiqueue run is cancelled, as from its
        page (its call is cut, what it cost is in the ledger, the page says so); any other RQ
        job gets JobStopped in its thread, and RQ records it as stopped. False if this worker
        does not run it."""
        with self._lock:
            flight = self._in_flight.get(job_id)
            thread_id = flight.thread_id if flight is not None else None
            if flight is None or flight.execution is None:  # not started, or ending
                log.info("worker %s: not running job %s, stop ignored", self.name, job_id)
                return False
            is_run = flight.job.func_name == queueing.TASK
        if is_run:
            code = flight.job.args[0] if flight.job.args else ""
            job = Job.objects.filter(code=code).first()
            try:
                if job is not None:
                    services.do_cancel_job(job, actor=None, reason="stopped through RQ")
            finally:
                connections.close_all()
            return job is not None
        with self._lock:
            self._stopping.add(job_id)
        if thread_id is None or not self.death_penalty_class.stop_thread(thread_id, JobStopped):
            with self._lock:
                self._stopping.discard(job_id)
            return False
        return True

    def _register_stop(self) -> None:
        try:
            super().teardown()
        except redis.RedisError as exc:
            log.warning(
                "worker %s: could not register its stop, Redis unavailable: %s", self.name, exc
            )

    def run_maintenance_tasks(self) -> None:
        if not self._loop_gate.call("maintenance", super().run_maintenance_tasks):
            self.last_cleaned_at = now()  # next try in one maintenance interval
        try:
            # Runs of this host's dead worker processes come back at once; the first pass runs
            # as the worker starts, so a restarted worker recovers its predecessor's runs.
            reconcile.recover_dead_local()
            reconcile.run_if_due(settings.AIQUEUE_RECONCILE_INTERVAL)
        except Exception:
            log.exception("reconciler pass failed; the next pass will try again")

    def work(self, *args, **kwargs) -> bool:
        if self._monitor_stop.is_set():
            # work() again after an earlier work() ended (a burst, then another): that one's
            # threads have exited; start afresh, as RQ's workers allow.
            self._monitor_stop = threading.Event()
            self._monitor, self._call_loop = None, None
            self._slots = threading.Semaphore(self.threads)
            self._draining = self._cold = False
        heartbeats.install(self._beats)
        try:
            return super().work(*args, **kwargs)
        finally:
            heartbeats.install(None)
            loop.install(None)

    # --- the main thread: dequeue when a thread is free -----------------------------------
    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        # Threads start here, after work() forked RQ's scheduler: forking a process that
        # already runs threads can deadlock the child.
        self._start_threads()
        while not self._slots.acquire(timeout=1):
            if self._stop_requested:
                raise StopRequested()
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
        result = None
        try:
            result = self._dequeue(timeout, max_idle_time)
            return result
        finally:
            if result is None:
                self._slots.release()

    def _dequeue(self, timeout, max_idle_time):
        """RQ's dequeue loop (BaseWorker.dequeue_job_and_maintain_ttl), with the stop request
        checked between waits and a signal allowed to interrupt only the blocking pop."""
        self.set_state(WorkerStatus.IDLE)
        idle_since = now()
        while True:
            if self._stop_requested:
                raise StopRequested()
            if self._loop_gate.is_down:
                # Redis was away a moment ago: wait for the retry (stoppable), then try again.
                self._sleep_unless_stopped(self._loop_gate.seconds_to_retry())
                if self._stop_requested:
                    raise StopRequested()
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                if self._stop_requested:
                    raise StopRequested()
                if self._drain_requested():
                    # An operator drained this worker (jobs.drain): it takes no job, and goes on
                    # beating and running its maintenance pass while its runs in flight finish.
                    # In burst mode (timeout None) that is the end of the burst.
                    if timeout is None:
                        return None
                    self._sleep_unless_stopped(1)
                    continue
                if timeout is not None and max_idle_time is not None:
                    idle_left = max_idle_time - (now() - idle_since).total_seconds()
                    if idle_left <= 0:
                        return None
                    timeout = max(1, min(timeout, math.ceil(idle_left)))
                self._in_blpop = True
                try:
                    result = self.queue_class.dequeue_any(
                        self._ordered_queues,
                        timeout,
                        connection=self.connection,
                        job_class=self.job_class,
                        serializer=self.serializer,
                        death_penalty_class=self.death_penalty_class,
                    )
                finally:
                    self._in_blpop = False
                if result is not None:
                    job, queue = result
                    self.reorder_queues(reference_queue=queue)
                    job.redis_server_version = self.get_redis_server_version()
                    if self.log_job_description:
                        self.log.info(
                            "Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id
                        )
                    else:
                        self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
                elif timeout is None and self._wait_for_one_to_finish():
                    # A burst ends when the queues are empty and nothing runs: a job still in
                    # flight may yet enqueue more (a retry, a dependent, a document's chunks).
                    continue
                self._loop_gate.succeeded()
                return result
            except DequeueTimeout:
                continue
            except redis.RedisError as exc:
                self._loop_gate.failed("waiting for a job", exc)
                continue
            self._loop_gate.succeeded()

    def _wait_for_one_to_finish(self) -> bool:
        """Wait until a job in flight ends (or a stop is asked); False if none was running."""
        with self._lock:
            running = len(self._in_flight)
            if not running:
                return False
            while len(self._in_flight) >= running and not self._stop_requested:
                self._changed.wait(timeout=0.2)
        return True

    def _drain_requested(self) -> bool:
        if time.monotonic() - self._drain_checked >= 1:
            self._drain_checked = time.monotonic()
            self._drained = drain.is_requested(self.name)
        return self._drained

    def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        with self._lock:
            if job.id in self._in_flight:
                # A second queue entry of a job this worker has taken and not finished: the
                # reconciler re-enqueues an entry it finds "queued" on no queue, which is also
                # what a popped entry looks like until its run marks it started, and on a busy
                # call loop that can take a while. Its run here is the one; drop the copy.
                log.warning(
                    "worker %s: job %s is already running here; dropped a second entry",
                    self.name,
                    job.id,
                )
                self._slots.release()
                return
            self._in_flight[job.id] = _InFlight(job, queue)
        if self.inline:
            self._run_one(job, queue)
        elif job.func_name == queueing.TASK:
            self._call_loop.spawn(self._run_one, job, queue)
        else:
            threading.Thread(
                target=self._run_in_thread, args=(job, queue), name=f"job-{job.id}", daemon=True
            ).start()

    def _start_threads(self) -> None:
        if self._monitor is not None or self._monitor_stop.is_set():
            return
        if not self.inline:
            self._call_loop = loop.CallLoop().start()
            loop.install(self._call_loop)
        self._monitor = threading.Thread(target=self._monitor_main, name="monitor", daemon=True)
        self._monitor.start()

    # --- running one job: on the call loop, a thread of its own, or the caller's (inline) ---
    def _run_in_thread(self, job: RQJob, queue: Queue) -> None:
        try:
            self._run_one(job, queue)
        except BaseException:  # a stray timeout or stop after the job's own handling
            log.exception("worker thread: job %s ended abnormally", job.id)

    def _run_one(self, job: RQJob, queue: Queue) -> None:
        try:
            retry_redis(f"starting {job.id}", lambda: self.prepare_execution(job), self.name)
            with self._lock:
                self._in_flight[job.id].execution = self.execution
                if loop.current() is None:
                    self._in_flight[job.id].thread_id = threading.get_ident()
            self.perform_job(job, queue)
        except Exception:
            self._fail_after_error_outside_job(job, queue, traceback.format_exc())
        finally:
            self.execution = None
            # The job boundary: this thread's connection back to the pool, or closed if
            # broken or too old (runs.dbconn).
            dbconn.end_of_job()
            with self._lock:
                self._in_flight.pop(job.id, None)
                self._changed.notify_all()
            self._slots.release()

    def _fail_after_error_outside_job(self, job: RQJob, queue: Queue, exc_string: str) -> None:
        """RQ's bookkeeping itself raised, outside the job's function (an exception handler
        that raises, Redis away for longer than the retries): fail the job now, as RQ's
        worker does when its work horse exits with an error, instead of leaving it "started"
        until RQ gives it up as abandoned, its timeout + 60 s later. A job that finished (or
        failed) before the error, or whose key is gone (result_ttl=0), is left alone."""
        log.error(
            "worker %s: job %s failed outside its function\n%s", self.name, job.id, exc_string
        )
        try:
            if job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED):
                return
        except InvalidJobOperation:
            return
        job.ended_at = now()
        self.handle_job_failure(job, queue=queue, exc_string=exc_string)

    def _monitor_main(self) -> None:
        interval = settings.AIQUEUE_HEARTBEAT_INTERVAL
        # The runs' heartbeats live in the database and go on while Redis is away.
        gate = RedisGate(self.name, on_back=self._redis_back)
        while not self._monitor_stop.wait(interval):
            try:
                self._beats.beat()
            except Exception:
                log.exception("heartbeat of the runs in flight failed; next beat will retry")
            finally:
                connections.close_all()
            try:
                gate.call("RQ heartbeat", self._beat_rq)
            except Exception:
                log.exception("RQ heartbeat failed; next beat will retry")

    def _beat_rq(self) -> None:
        # Under the lock, so no beat lands after _stop_beating: a beat written after RQ deleted
        # an execution re-creates a partial execution hash, and the next run of the same RQ id
        # (a parked job coming back) then fails in RQ's cleanup (KeyError: b'created_at').
        with self._lock, self.connection.pipeline() as pipe:
            self.heartbeat(pipeline=pipe)
            for flight in self._in_flight.values():
                if flight.execution is None:
                    continue
                ttl = self.get_heartbeat_ttl(flight.job)
                flight.execution.heartbeat(flight.job.started_job_registry, ttl, pipeline=pipe)
            pipe.execute()

    def _stop_beating(self, job: RQJob) -> None:
        with self._lock:
            flight = self._in_flight.get(job.id)
            if flight is not None:
                flight.execution = None

    # --- stopping -------------------------------------------------------------------------
    def request_stop(self, signum, frame) -> None:
        """Warm shutdown: stop taking jobs; the jobs in flight get the grace period."""
        self._shutdown_requested_date = now()
        # From now on no run starts a call: it is handed back instead (runs.shutdown).
        shutdown.begin()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        self.handle_warm_shutdown_request()
        self._stop_requested = True
        if self._in_blpop:
            # Blocked on Redis waiting for a job: stop waiting (RQ does the same when idle).
            # Never elsewhere: inside the maintenance pass the reconciler would swallow it
            # mid-write, and after a pop the job would be lost.
            raise StopRequested()

    def request_force_stop(self, signum, frame) -> None:
        if (now() - self._shutdown_requested_date) < timedelta(seconds=1):
            return  # the same stop delivered twice (process group + pool), as RQ ignores it
        self.log.warning("Worker %s: cold shut down, handing back the jobs in flight", self.name)
        self._cold = True
        if not self._draining:
            raise SystemExit()

    def teardown(self) -> None:
        if self._shutdown_requested_date is not None and self.in_flight:
            # As RQ records a warm stop that waits for its job (here, not in the signal
            # handler: a Redis call there could wait on a lock the interrupted code holds).
            self._loop_gate.call("recording the stop", self.set_shutdown_requested_date)
        self._drain()
        if self._call_loop is not None:
            self._call_loop.stop()  # its thread ends once no run is left on it
        self._monitor_stop.set()  # no beat may re-add an execution the hand-back dropped
        handed_back = self._hand_back()
        self._register_stop()
        if handed_back:
            # Threads still inside a hand-back run must not write after it: leave now.
            logging.shutdown()
            os._exit(0)

    def _drain(self) -> None:
        self._draining = True
        started = time.monotonic()
        with self._lock:
            while self._in_flight and not self._cold:
                if self._stop_requested and time.monotonic() - started >= self.shutdown_grace:
                    break
                self._changed.wait(timeout=0.2)

    def _hand_back(self) -> int:
        """Send the runs still in flight back to the queue (running → queued + enqueue)."""
        runs = self._beats.snapshot()
        if not runs:
            return 0
        count = 0
        try:
            for job in Job.objects.filter(
                run_token__in=list(runs), status=Job.Status.RUNNING
            ).select_related("workload"):
                if services.do_recover_stale_run(
                    job,
                    reason=shutdown.HANDED_BACK,
                    lost_calls="its worker stopped before the call ended",
                ):
                    count += 1
        except Exception:
            log.exception("hand-back failed; the reconciler will recover these runs")
        finally:
            connections.close_all()
        log.warning("worker %s: handed back %d run(s) still in flight", self.name, count)
        return count or len(runs)


def build_worker(
    *, name: str | None = None, threads: int | None = None, inline: bool = False
) -> Worker:
    """The worker on aiqueue's queues running `threads` jobs at once (AIQUEUE_WORKER_CONCURRENCY
    when None); `inline=True` runs the jobs on the calling thread (the test suite's in-process
    worker)."""
    queues = [queueing.queue(q) for q in settings.RQ_QUEUE_NAMES]
    return Worker(
        queues, connection=queues[0].connection, name=name, threads=threads, inline=inline
    )


# The class path earlier releases documented (`rqworker --worker-class
# runs.worker.ThreadPoolWorker`, process-manager configs): the same worker.
ThreadPoolWorker = Worker
