"""The aiqueue workers: RQ's worker plus the reconciler in its maintenance pass.

- `Worker`: one job at a time (RQ's SimpleWorker, no fork).
- `ThreadPoolWorker`: many jobs at once in one process, one thread per job in flight. An AI
  call is almost all waiting, so one process holds dozens of calls instead of one.

`manage.py worker --threads N` runs a ThreadPoolWorker (N from AIQUEUE_WORKER_THREADS);
`--threads 1` runs the plain Worker. django-rq's `rqworker --worker-class
jobs.worker.ThreadPoolWorker` works too. The reconciler runs here rather than as a job
scheduled in Redis because it must survive Redis losing its data: a schedule stored in Redis
would be lost with it.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import queue as queue_module
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections, connections
from rq.exceptions import DequeueTimeout, StopRequested
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.timeouts import BaseDeathPenalty, JobTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from jobs import dbconn, heartbeats, queueing, reconcile
from jobs.flow.priorities import StarvationGuardMixin

log = logging.getLogger(__name__)

# RQ's worker blocks on the queues for worker_ttl - 15 s; keep that short so the maintenance
# pass (and with it the reconciler) runs every few seconds even on an idle worker.
WORKER_TTL = 30


class Worker(StarvationGuardMixin, SimpleWorker):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", settings.AIQUEUE_RECONCILE_INTERVAL)
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up at least once per reconcile interval so a dead worker's job is noticed fast.
        return max(1, min(self.worker_ttl - 15, settings.AIQUEUE_RECONCILE_INTERVAL))

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

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            reconcile.run_if_due(settings.AIQUEUE_RECONCILE_INTERVAL)
        except Exception:
            log.exception("reconciler pass failed; the next pass will try again")


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
    """

    def __init__(self, timeout, exception=JobTimeoutException, **kwargs) -> None:
        super().__init__(timeout, exception, **kwargs)
        self._thread_id = threading.get_ident()
        self._lock = threading.Lock()
        self._armed = False
        self._fired = False
        self._timer: threading.Timer | None = None
        message = f"Task exceeded maximum timeout value ({timeout} seconds)"

        def init(self_exc, *args) -> None:
            exception.__init__(self_exc, message)

        self._exception = type(exception.__name__, (exception,), {"__init__": init})

    def setup_death_penalty(self) -> None:
        if self._timeout <= 0:
            return
        with self._lock:
            self._armed = True
        self._timer = threading.Timer(self._timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self._armed = False
            self._fired = True
            _set_async_exc(self._thread_id, self._exception)

    def cancel_death_penalty(self) -> None:
        with self._lock:
            self._armed = False
            if self._timer is not None:
                self._timer.cancel()
            if self._fired:
                # Fired, but the job ended before the exception was delivered: drop it.
                _set_async_exc(self._thread_id, None)


def _set_async_exc(thread_id: int, exception: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None
    )


@dataclass
class _InFlight:
    job: RQJob
    queue: Queue
    execution: Any = None


class ThreadPoolWorker(Worker):
    """Runs up to `threads` jobs at once in one process, keeping RQ's guarantees per job.

    - The main thread dequeues (priority order: the queue order, high → default → low) only
      when a thread is free, so no job waits in this process's memory where a crash would
      lose it. It also runs the maintenance pass (RQ registries, scheduler, reconciler).
    - Each job runs in a pool thread with RQ's own bookkeeping: an execution in the queue's
      StartedJobRegistry, the job's timeout (ThreadDeathPenalty), success/failure handling.
      Its database connections are closed (or returned to the pool) when it ends.
    - A monitor thread beats every AIQUEUE_HEARTBEAT_INTERVAL s: one UPDATE refreshes
      `heartbeat_at` of every run in flight (jobs.heartbeats) and one Redis pipeline refreshes
      the worker's and every execution's RQ heartbeat.
    - SIGTERM/SIGINT: stop dequeuing, let the jobs in flight finish for up to
      AIQUEUE_WORKER_SHUTDOWN_GRACE s, then hand the rest back (running → queued, re-enqueued)
      and exit. A second signal hands back at once. SIGKILL: nothing runs; the reconciler
      notices the silent heartbeats after AIQUEUE_STALE_RUNNING_AFTER s and re-queues the
      jobs; the fencing token keeps a late finisher from finishing twice.
    """

    death_penalty_class = ThreadDeathPenalty

    def __init__(
        self, *args, threads: int | None = None, shutdown_grace: int | None = None, **kwargs
    ) -> None:
        # Before RQ's __init__, which sets `self.execution` (a per-thread property here).
        self._local = threading.local()
        self.threads = threads or settings.AIQUEUE_WORKER_THREADS
        self.shutdown_grace = (
            settings.AIQUEUE_WORKER_SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace
        )
        self._slots = threading.Semaphore(self.threads)
        self._tasks: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._pool: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._in_flight: dict[str, _InFlight] = {}
        self._beats = heartbeats.RunHeartbeats()
        self._monitor_stop = threading.Event()
        self._in_blpop = False
        self._draining = False
        self._cold = False
        self._suspension_checked = -1.0
        super().__init__(*args, **kwargs)
        # Two Redis connections per job thread (jobs.queueing.allow_connections), plus the
        # main thread's blocking pop and the monitor's beat; for RQ's client and aiqueue's.
        for client in (self.connection, queueing.connection()):
            queueing.allow_connections(client, 2 * self.threads + 8)

    # RQ keeps "the" current execution on the worker; here there is one per thread.
    @property
    def execution(self):
        return getattr(self._local, "execution", None)

    @execution.setter
    def execution(self, value) -> None:
        self._local.execution = value

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def work(self, *args, **kwargs) -> bool:
        heartbeats.install(self._beats)
        try:
            return super().work(*args, **kwargs)
        finally:
            heartbeats.install(None)

    # --- the main thread: dequeue when a thread is free -----------------------------------
    # RQ's loop beats for the worker twice and checks for `rq suspend` once per job it hands
    # out: five Redis round trips on the one thread that hands out every job, which competes
    # with the job threads for the interpreter. The worker's key lives worker_ttl + 60 s and
    # the monitor beats every AIQUEUE_HEARTBEAT_INTERVAL s, so once a second is plenty.
    def heartbeat(self, timeout=None, pipeline=None) -> None:
        last = getattr(self, "last_heartbeat", None)
        if timeout is None and pipeline is None and last and (now() - last).total_seconds() < 1:
            return
        super().heartbeat(timeout, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._suspension_checked < 1:
            return
        self._suspension_checked = time.monotonic()
        super().check_for_suspension(burst)

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
        connection_wait = 1.0
        idle_since = now()
        while True:
            if self._stop_requested:
                raise StopRequested()
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                if self._stop_requested:
                    raise StopRequested()
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
                    self.log.debug("Worker %s: %s: %s", self.name, queue.name, job.id)
                return result
            except DequeueTimeout:
                continue
            except redis.exceptions.ConnectionError as exc:
                self.log.error("Worker %s: Redis unavailable (%s), retrying", self.name, exc)
                time.sleep(connection_wait)
                connection_wait = min(connection_wait * 2, 60)

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        with self._lock:
            self._in_flight[job.id] = _InFlight(job, queue)
        self._tasks.put((job, queue))

    def _start_threads(self) -> None:
        if self._pool:
            return
        for i in range(self.threads):
            thread = threading.Thread(target=self._thread_main, name=f"job-{i}", daemon=True)
            thread.start()
            self._pool.append(thread)
        threading.Thread(target=self._monitor_main, name="monitor", daemon=True).start()

    # --- pool threads ---------------------------------------------------------------------
    def _thread_main(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            job, queue = item
            try:
                self.prepare_execution(job)
                with self._lock:
                    self._in_flight[job.id].execution = self.execution
                self.perform_job(job, queue)
            except BaseException:  # a thread must survive whatever one job does
                log.exception("worker thread: job %s ended abnormally", job.id)
            finally:
                self.execution = None
                # The job boundary: this thread's connection back to the pool, or closed if
                # broken or too old (jobs.dbconn).
                dbconn.end_of_job()
                with self._lock:
                    self._in_flight.pop(job.id, None)
                    self._changed.notify_all()
                self._slots.release()

    def _monitor_main(self) -> None:
        interval = settings.AIQUEUE_HEARTBEAT_INTERVAL
        while not self._monitor_stop.wait(interval):
            try:
                self._beats.beat()
            except Exception:
                log.exception("heartbeat of the runs in flight failed; next beat will retry")
            finally:
                connections.close_all()
            try:
                self._beat_rq()
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

    def handle_job_success(self, job, queue, *args, **kwargs):
        self._stop_beating(job)  # RQ deletes the execution next
        return super().handle_job_success(job, queue, *args, **kwargs)

    def handle_job_failure(self, job, queue, *args, **kwargs):
        self._stop_beating(job)
        return super().handle_job_failure(job, queue, *args, **kwargs)

    # --- stopping -------------------------------------------------------------------------
    def request_stop(self, signum, frame) -> None:
        """Warm shutdown: stop taking jobs; the jobs in flight get the grace period."""
        self._shutdown_requested_date = now()
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
        self._drain()
        for _ in self._pool:
            self._tasks.put(None)
        handed_back = self._hand_back()
        self._monitor_stop.set()
        super().teardown()
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
        from jobs import services
        from jobs.models import Job

        runs = self._beats.snapshot()
        if not runs:
            return 0
        count = 0
        try:
            for job in Job.objects.filter(
                run_token__in=list(runs), status=Job.Status.RUNNING
            ).select_related("workload"):
                if services.do_recover_stale_run(
                    job, reason="handed back: the worker stopped before the run finished"
                ):
                    count += 1
        except Exception:
            log.exception("hand-back failed; the reconciler will recover these runs")
        finally:
            connections.close_all()
        log.warning("worker %s: handed back %d run(s) still in flight", self.name, count)
        return count or len(runs)


def build_worker(
    *, name: str | None = None, threads: int | None = None
) -> Worker | ThreadPoolWorker:
    """A ThreadPoolWorker with `threads` threads; the one-job-at-a-time Worker for None or 1
    (what the test suite runs in-process). `manage.py worker` passes AIQUEUE_WORKER_THREADS."""
    queues = [queueing.queue(q) for q in settings.RQ_QUEUE_NAMES]
    if threads is None or threads <= 1:
        return Worker(queues, connection=queues[0].connection, name=name)
    return ThreadPoolWorker(queues, connection=queues[0].connection, name=name, threads=threads)
