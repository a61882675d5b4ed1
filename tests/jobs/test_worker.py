"""The worker (runs.worker.Worker), as real `manage.py worker` processes
on the suite's Redis and test database, calling the simulator over HTTP."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta

import django_rq
import pytest
from django.utils import timezone
from rq.job import Job as RQJob
from rq.job import JobStatus

from jobs import queueing, services
from jobs.models import Attempt, Job
from runs import reconcile
from tests.factories import submit
from tests.helpers import spawn, start_worker, stop, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)


def submit_many(workload, user, n: int) -> list[Job]:
    return [submit(workload, user, f"notes number {i}") for i in range(n)]


def statuses(jobs: list[Job]) -> list[str]:
    return list(Job.objects.filter(pk__in=[j.pk for j in jobs]).values_list("status", flat=True))


def count(jobs: list[Job], status: str) -> int:
    return Job.objects.filter(pk__in=[j.pk for j in jobs], status=status).count()


def test_one_worker_process_runs_jobs_concurrently(redis_conn, workload, user, simulator, tmp_path):
    simulator.control(latency_ms=1500)
    jobs = submit_many(workload, user, 2)
    worker = start_worker(tmp_path, threads=4)
    try:
        wait_for(lambda: count(jobs, "succeeded") == 2, timeout=60)
    finally:
        stop(worker)
    # Both calls were open at the simulator at the same moment, from one process.
    assert simulator.counters()["peak_in_flight"] == 2
    assert simulator.counters()["requests_total"] == 2


def test_django_rqs_rqworker_runs_the_threaded_worker_class(
    redis_conn, workload, user, simulator, tmp_path
):
    simulator.control(latency_ms=1500)
    jobs = submit_many(workload, user, 3)
    worker = spawn(
        [sys.executable, "manage.py", "rqworker", "high", "default", "low",
         "--worker-class", "runs.worker.ThreadPoolWorker", "--burst"],
        tmp_path,
        {**worker_env(heartbeat=1, stale_after=3), "AIQUEUE_WORKER_THREADS": "4"},
    )  # fmt: skip
    try:
        assert worker.wait(timeout=60) == 0  # burst: returns once the jobs in flight are done
    finally:
        stop(worker)
    assert statuses(jobs) == ["succeeded"] * 3
    assert simulator.counters()["peak_in_flight"] == 3  # in one process, at once


def test_job_timeout_kills_only_that_job(redis_conn, workload, user, simulator, tmp_path):
    simulator.control(latency_ms=2000)
    queue = django_rq.get_queue("default")
    doomed = queue.enqueue("tests.jobs.worker_tasks.spin", 30, job_timeout=1, result_ttl=600)
    survivor = queue.enqueue("tests.jobs.worker_tasks.spin", 3, job_timeout=60, result_ttl=600)
    jobs = submit_many(workload, user, 2)
    worker = start_worker(tmp_path, threads=6)
    try:
        wait_for(lambda: count(jobs, "succeeded") == 2, timeout=60)
        wait_for(
            lambda: (
                RQJob.fetch(survivor.id, connection=redis_conn).get_status() == JobStatus.FINISHED
            ),
            timeout=30,
        )
        wait_for(
            lambda: RQJob.fetch(doomed.id, connection=redis_conn).get_status() == JobStatus.FAILED,
            timeout=30,
        )
        # The same process is still taking jobs after the timeout.
        late = submit_many(workload, user, 1)
        wait_for(lambda: count(late, "succeeded") == 1, timeout=30)
        assert worker.poll() is None
    finally:
        stop(worker)
    failed = RQJob.fetch(doomed.id, connection=redis_conn)
    # Recorded as stock RQ records it (it read runs.worker.JobTimeoutException).
    assert "rq.timeouts.JobTimeoutException: " in failed.latest_result().exc_string
    assert "maximum timeout value (1 seconds)" in failed.latest_result().exc_string
    assert RQJob.fetch(survivor.id, connection=redis_conn).return_value() == "spun"


def test_rqs_stop_job_command_stops_that_job_and_cancels_an_aiqueue_run(
    redis_conn, workload, user, simulator, tmp_path
):
    # Stock RQ stops the job (status "stopped", not retried); the threaded worker ignored it
    # and ran the job to its end. An aiqueue run told to stop is cancelled, as from its page.
    from rq.command import send_stop_job_command

    simulator.control(latency_ms=20_000)
    queue = django_rq.get_queue("default")
    doomed = queue.enqueue("tests.jobs.worker_tasks.spin", 30, result_ttl=600, failure_ttl=600)
    other = queue.enqueue("tests.jobs.worker_tasks.spin", 3, result_ttl=600)
    (run,) = submit_many(workload, user, 1)
    worker = start_worker(tmp_path, threads=4)

    def rq_status(rq_job) -> str:
        return RQJob.fetch(rq_job.id, connection=redis_conn).get_status()

    try:
        wait_for(lambda: rq_status(doomed) == JobStatus.STARTED, timeout=30)
        wait_for(lambda: count([run], "running") == 1, timeout=30)
        send_stop_job_command(redis_conn, doomed.id)
        send_stop_job_command(redis_conn, run.rq_job_id)
        wait_for(lambda: rq_status(doomed) == JobStatus.STOPPED, timeout=10)
        wait_for(lambda: count([run], "cancelled") == 1, timeout=10)
        wait_for(lambda: rq_status(other) == JobStatus.FINISHED, timeout=30)
        assert worker.poll() is None  # the worker goes on
    finally:
        stop(worker)
    # As stock RQ keeps it: the stopped job in the failed registry, with its status "stopped".
    assert queue.failed_job_registry.get_job_ids() == [doomed.id]
    assert Job.objects.get(pk=run.pk).events.filter(to_status="cancelled").exists()


def test_sigterm_lets_jobs_in_flight_finish_and_takes_no_new_ones(
    redis_conn, workload, user, simulator, tmp_path
):
    simulator.control(latency_ms=5000)  # a window to see the drain in
    jobs = submit_many(workload, user, 5)
    worker = start_worker(tmp_path, threads=10, grace=30)
    try:
        wait_for(lambda: simulator.counters()["in_flight"] == 5, timeout=30)
        worker.send_signal(signal.SIGTERM)
        # Submitted after the stop request: this worker must leave it in the queue.
        later = submit_many(workload, user, 1)
        # While it drains, RQ's registration says a shutdown was asked (`rq info`, the admin).
        from rq.worker import Worker as RQWorker

        def shutdown_recorded() -> bool:
            found = [w for w in RQWorker.all(connection=redis_conn) if w.pid == worker.pid]
            return bool(found) and found[0].shutdown_requested_date is not None

        wait_for(shutdown_recorded, timeout=4)
        assert worker.wait(timeout=30) == 0
    finally:
        stop(worker)
    assert statuses(jobs) == ["succeeded"] * 5
    assert statuses(later) == ["queued"]
    assert simulator.counters()["requests_total"] == 5


def test_sigterm_hands_back_runs_that_outlive_the_grace_period(
    redis_conn, workload, user, simulator, tmp_path
):
    simulator.control(latency_ms=20000)
    jobs = submit_many(workload, user, 3)
    worker = start_worker(tmp_path, threads=5, grace=1)
    try:
        wait_for(lambda: simulator.counters()["in_flight"] == 3, timeout=30)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)
    finally:
        stop(worker)
    # Back in the queue at once, not after the reconciler's stale timeout.
    assert statuses(jobs) == ["queued"] * 3
    for job in jobs:
        reasons = list(job.events.values_list("reason", flat=True))
        assert "handed back: the worker stopped before the run finished" in reasons

    simulator.control(latency_ms=0)
    rescuer = start_worker(tmp_path, threads=5)
    try:
        wait_for(lambda: count(jobs, "succeeded") == 3, timeout=60)
    finally:
        stop(rescuer)


def test_two_hundred_calls_wait_at_once_in_one_process_without_a_thread_each(
    redis_conn, workload, user, simulator, tmp_path
):
    simulator.control(latency_ms=4000)
    jobs = submit_many(workload, user, 200)
    worker = start_worker(tmp_path, threads=200)
    try:
        wait_for(lambda: simulator.counters()["in_flight"] == 200, timeout=60)
        # The runs wait on the call loop: the process has its main, loop, monitor and a few
        # helper threads (RQ's, the live publisher's), not one per call.
        assert len(os.listdir(f"/proc/{worker.pid}/task")) < 20
        wait_for(lambda: count(jobs, "succeeded") == 200, timeout=60)
        assert worker.poll() is None
    finally:
        stop(worker)
    assert simulator.counters()["peak_in_flight"] == 200
    assert simulator.counters()["requests_total"] == 200


@pytest.mark.parametrize("in_flight", [20, 200])
def test_sigkill_with_calls_in_flight_recovers_all_and_charges_each_success_once(
    redis_conn, workload, user, simulator, tmp_path, in_flight
):
    simulator.control(latency_ms=8000)
    jobs = submit_many(workload, user, in_flight)
    worker = start_worker(tmp_path, threads=in_flight)
    try:
        wait_for(lambda: count(jobs, "running") == in_flight, timeout=60)
        wait_for(lambda: simulator.counters()["in_flight"] == in_flight, timeout=30)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    simulator.control(latency_ms=0)

    rescuer = start_worker(tmp_path, threads=in_flight)
    try:
        wait_for(lambda: count(jobs, "succeeded") == in_flight, timeout=90)
    finally:
        stop(rescuer)

    # The calls in flight died with the worker, as many more finished the jobs: the ledger has
    # every one of them, the lost ones charged at their worst case (the provider may have
    # billed them).
    assert simulator.counters()["requests_total"] == 2 * in_flight
    assert Attempt.objects.filter(job__in=jobs).count() == 2 * in_flight
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        successes = Attempt.objects.filter(job=job, http_status=200)
        assert successes.count() == 1
        lost = Attempt.objects.get(job=job, state="unknown")
        assert lost.error_message.startswith("outcome unknown: charged as reserved")
        assert lost.cost == lost.reserved_cost > 0
        assert not lost.consumes_attempt
        assert job.cost_actual == successes.get().cost + lost.cost
        reasons = list(job.events.values_list("reason", flat=True))
        assert "worker lost: its process is gone" in reasons


def test_a_second_queue_entry_of_a_job_running_here_is_dropped(
    redis_conn, workload, user, simulator, tmp_path
):
    """The reconciler re-enqueues an entry that says "queued" but is on no queue, which is
    also how an entry looks between its pop and its run's start; on a busy call loop that
    window is wide (seen in CI: KeyError in the worker, the copy run beside the first). The
    copy must not run, nor end the first run's RQ execution under it."""
    simulator.control(latency_ms=3000)
    job = submit(workload, user, "notes taken once")
    worker = start_worker(tmp_path, threads=10)
    try:
        wait_for(lambda: simulator.counters()["in_flight"] == 1, timeout=30)
        rq_queue = django_rq.get_queue(job.priority)
        redis_conn.rpush(rq_queue.key, job.rq_job_id)
        wait_for(lambda: redis_conn.llen(rq_queue.key) == 0, timeout=10)
        time.sleep(0.5)  # the copy, had it run, would have ended by now (the row is running)
        assert simulator.counters()["in_flight"] == 1
        assert RQJob.fetch(job.rq_job_id, connection=redis_conn).get_status() == "started"
        wait_for(lambda: count([job], "succeeded") == 1, timeout=30)
    finally:
        stop(worker)
    assert simulator.counters()["requests_total"] == 1
    assert Attempt.objects.filter(job=job).count() == 1
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert "Traceback" not in logs
    assert "already running here; dropped a second entry" in logs


def test_more_threads_than_redis_py_allows_by_default_all_get_a_connection(redis_conn):
    # redis-py refuses a 101st connection per pool (MaxConnectionsError); a job thread can
    # hold two at once. 120 threads, each holding a connection for 1 s at the same moment:
    # every job must run and the worker must survive.
    from runs.worker import Worker

    queue = django_rq.get_queue("default")
    for _ in range(120):
        queue.enqueue("tests.jobs.worker_tasks.hold_redis", 1, result_ttl=0)
    worker = Worker([queue], connection=queue.connection, threads=120)
    worker.work(burst=True, with_scheduler=False)
    assert int(redis_conn.get("aiqueue:test:held")) == 120
    assert queue.failed_job_registry.count == 0
    assert queue.count == 0


def test_handing_out_jobs_beats_for_the_worker_at_most_once_a_second(redis_conn, monkeypatch):
    # RQ's loop beat twice per job handed out (two Redis round trips each on the thread that
    # hands out every job); the threaded worker's key is kept alive by its monitor instead.
    from rq.worker.base import BaseWorker

    from runs.worker import Worker

    beats = []
    original = BaseWorker.heartbeat

    def counted(self, timeout=None, pipeline=None):
        if pipeline is None:
            beats.append(timeout)
        return original(self, timeout, pipeline)

    monkeypatch.setattr(BaseWorker, "heartbeat", counted)
    queue = django_rq.get_queue("default")
    for _ in range(60):
        queue.enqueue("os.getpid", result_ttl=0)
    worker = Worker([queue], connection=queue.connection, threads=4)
    started = time.monotonic()
    worker.work(burst=True, with_scheduler=False)
    seconds = time.monotonic() - started
    assert queue.count == 0
    assert queue.failed_job_registry.count == 0
    assert len(beats) <= seconds + 3  # was 120 for 60 jobs


def test_a_burst_runs_what_a_job_in_flight_enqueues_before_it_ends(redis_conn):
    # With four threads the queue is empty while the first job still runs; the burst must not
    # end then, or what it enqueues (a webhook's retry, a dependent) waits for the next worker.
    from rq.job import Job as RQJob

    from runs.worker import Worker

    queue = django_rq.get_queue("default")
    queue.enqueue("tests.jobs.worker_tasks.enqueue_later", 0.5, "the-next-one", result_ttl=0)
    worker = Worker([queue], connection=queue.connection, threads=4)
    worker.work(burst=True, with_scheduler=False)
    assert RQJob.fetch("the-next-one", connection=redis_conn).get_status() == JobStatus.FINISHED
    assert queue.count == 0


def test_one_worker_can_work_again_after_its_burst(redis_conn):
    # A second work() found the first one's threads gone and waited forever for them.
    from runs.worker import Worker

    queue = django_rq.get_queue("default")
    worker = Worker([queue], connection=queue.connection, threads=2)
    first = queue.enqueue("os.getpid", result_ttl=60)
    worker.work(burst=True, with_scheduler=False)
    second = queue.enqueue("os.getpid", result_ttl=60)
    # On the main thread (RQ installs its signal handlers there); SIGALRM ends a hang.
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the second work() hung"))
    signal.alarm(15)
    try:
        worker.work(burst=True, with_scheduler=False)
    finally:
        signal.alarm(0)
    for job in (first, second):
        assert RQJob.fetch(job.id, connection=redis_conn).get_status() == JobStatus.FINISHED


def test_a_suspended_threaded_worker_takes_no_job(redis_conn):
    from rq.suspension import suspend

    from runs.worker import Worker

    queue = django_rq.get_queue("default")
    queue.enqueue("os.getpid", result_ttl=0)
    suspend(redis_conn)
    worker = Worker([queue], connection=queue.connection, threads=4)
    worker.work(burst=True, with_scheduler=False)
    assert queue.count == 1


def test_an_error_outside_the_job_function_fails_the_job_at_once(redis_conn):
    # Here an exception handler that raises (an error tracker that is down): RQ's bookkeeping
    # stopped half-way, and the job stayed "started" until RQ gave it up as abandoned, its
    # timeout + 60 s later. Stock RQ's worker fails it when its work horse exits so.
    from runs.worker import Worker

    def tracker_down(job, *exc_info):
        raise ConnectionError("the error tracker is down")

    queue = django_rq.get_queue("default")
    broken = queue.enqueue("math.sqrt", -1, failure_ttl=600)
    after = queue.enqueue("os.getpid", result_ttl=60)
    worker = Worker(
        [queue], connection=queue.connection, threads=1, exception_handlers=[tracker_down]
    )
    worker.work(burst=True, with_scheduler=False)
    job = RQJob.fetch(broken.id, connection=redis_conn)
    assert job.get_status() == JobStatus.FAILED
    assert broken.id in queue.failed_job_registry
    assert broken.id not in queue.started_job_registry
    assert "the error tracker is down" in job.latest_result().exc_string
    # The thread goes on to the next job.
    assert RQJob.fetch(after.id, connection=redis_conn).get_status() == JobStatus.FINISHED


def test_a_burst_takes_jobs_round_robin_when_asked(redis_conn):
    # work(dequeue_strategy="round_robin") was ignored: the starvation guard's order replaced
    # RQ's, and every job of the first queue ran before any of the second.
    from runs.worker import Worker

    queues = [django_rq.get_queue(name) for name in ("high", "default")]
    for queue in queues:
        for i in range(2):
            queue.enqueue("os.getpid", job_id=f"{queue.name}-{i}", result_ttl=60)
    worker = Worker(queues, connection=redis_conn, threads=1)
    worker.work(burst=True, with_scheduler=False, dequeue_strategy="round_robin")
    ids = ["high-0", "high-1", "default-0", "default-1"]
    started = {i: RQJob.fetch(i, connection=redis_conn).started_at for i in ids}
    assert sorted(ids, key=started.get) == ["high-0", "default-0", "high-1", "default-1"]


def test_each_job_taken_is_logged_as_rq_logs_it(redis_conn, caplog):
    # With its description unless `log_job_description` is off; it was a debug line without it.
    from runs.worker import Worker

    queue = django_rq.get_queue("default")
    worker = Worker([queue], connection=queue.connection, threads=1)
    for log_description, logged in ((True, "default: {description} ({id})"), (False, ": {id}")):
        job = queue.enqueue("os.getenv", "AIQUEUE_NO_SUCH_VARIABLE", result_ttl=0)
        worker.log_job_description = log_description
        caplog.clear()
        with caplog.at_level("INFO", logger="rq.worker"):
            worker.work(burst=True, with_scheduler=False)
        assert logged.format(description=job.description, id=job.id) in caplog.text
        assert ("AIQUEUE_NO_SUCH_VARIABLE" in caplog.text) is log_description


# --- timed wake-ups: RQ's scheduler, and the reconciler as its safety net ----------------------


def test_a_parked_job_is_woken_by_its_schedule_on_time(redis_conn, workload, user, tmp_path):
    # RQ keeps a schedule in whole seconds: a job due at hh:mm:05.999 was put on its queue at
    # hh:mm:05, found not yet due and dropped, and only the reconciler brought it back. Here
    # the reconciler looks only every 120 s: the job is woken in time by its schedule or not
    # within this test at all.
    environment = {**worker_env(heartbeat=1, stale_after=30), "AIQUEUE_RECONCILE_INTERVAL": "120"}
    worker = spawn([sys.executable, "manage.py", "worker", "--threads", "2"], tmp_path,
                   environment)  # fmt: skip
    try:
        wait_for(lambda: redis_conn.exists("rq:scheduler-lock:default"), timeout=30)
        due = datetime.fromtimestamp(math.floor(time.time()) + 1.999, tz=UTC)
        job = services.do_submit_job(
            workload=workload, input_text="notes", user=user, start_at=due
        )[0]
        assert job.status == "scheduled"
        wait_for(lambda: count([job], "succeeded") == 1, timeout=30)
    finally:
        stop(worker)
    woken = job.events.get(from_status="scheduled", to_status="queued")
    assert woken.reason == "resume time reached"
    # Due, rounded up to the second RQ keeps, then RQ's scheduler's 1 s poll: ~2 s, with room
    # for a loaded machine (the reconciler's wake-up would come two minutes later).
    assert due <= woken.created_at <= due + timedelta(seconds=6)


def test_reconciler_leaves_a_job_that_was_parked_again_while_it_looked(
    redis_conn, workload, user, settings, monkeypatch
):
    settings.AIQUEUE_ENQUEUE_GRACE = 0
    job = services.do_submit_job(workload=workload, input_text="notes", user=user)[0]
    services.do_park_job(
        job,
        reason="rate limited",
        resume_at=timezone.now() - timedelta(seconds=1),
        kind=Job.WaitKind.RATE_LIMIT,
    )
    looked_up = queueing.missing_rq_jobs

    def run_meanwhile(jobs, **kwargs):
        # Between the reconciler's read of the rows and its look in Redis, a worker runs the
        # job and parks it again; its new entry is written only once RQ has deleted the old
        # one (jobs.queueing._enqueue), so for that moment there is none.
        if job.pk not in {j.pk for j in jobs}:
            return looked_up(jobs, **kwargs)
        services.do_resume_job(job, reason="resume time reached", enqueue=False)
        token = services.do_start_run(job)
        services.do_park_job(
            job,
            reason="rate limited by provider",
            resume_at=timezone.now() + timedelta(seconds=60),
            kind=Job.WaitKind.RATE_LIMIT,
            token=token,
        )
        redis_conn.delete(RQJob.key_for(job.rq_job_id))
        return looked_up(jobs, **kwargs)

    monkeypatch.setattr(queueing, "missing_rq_jobs", run_meanwhile)
    report = reconcile.run()
    assert report.woken == 0
    job.refresh_from_db()
    assert job.status == "waiting"
    assert job.wait_reason == "rate limited by provider"
    assert not job.events.filter(reason__startswith="woken by the reconciler").exists()


def test_the_project_has_one_worker_class():
    """One worker class (runs.worker.Worker): every module of the project is imported, and
    the RQ worker classes it defines are counted. ThreadPoolWorker is the old path's alias."""
    import importlib
    import pkgutil

    from rq.worker import BaseWorker

    import runs.worker

    for package in ("aiqueue", "jobs", "review", "batches", "runs", "ops"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if ".migrations." not in info.name:
                importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = {
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in subclasses(BaseWorker)
        if cls.__module__.split(".")[0] in {"aiqueue", "jobs", "review", "batches", "runs", "ops"}
    }
    assert ours == {"runs.worker.Worker"}
    assert runs.worker.ThreadPoolWorker is runs.worker.Worker
    # ...and no other module runs one of RQ's stock worker classes instead (the webhook worker
    # ran rq.SimpleWorker): no call of a worker class imported from rq outside runs/worker.py.
    import ast
    from pathlib import Path

    def runs_a_stock_worker(tree) -> bool:
        names = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rq")
            for alias in node.names
            if alias.name.endswith("Worker")
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in names:
                    return True
                if (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "rq"
                    and func.attr.endswith("Worker")
                ):
                    return True
        return False

    root = Path(runs.worker.__file__).resolve().parent.parent
    running = {
        str(path.relative_to(root))
        for package in ("aiqueue", "jobs", "review", "batches", "runs", "ops")
        for path in (root / package).rglob("*.py")
        if runs_a_stock_worker(ast.parse(path.read_text()))
    }
    assert running == set()
