"""Faults of a running `./run`, as an operator meets them: a worker killed under load, Ctrl-C
with calls in flight and a second ./run, Redis killed and restarted (its own, and an external
one that comes back empty). Each starts a real ./run in a copy of the repository, submits jobs
through the API and reads the outcome from the app's database, the simulator's counters and
the supervisor's view of its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from aiqueue import redis_server
from tests.helpers import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.own_database]


def succeeded_once(app, codes: list[str]) -> None:
    """Every job succeeded, and exactly one call of each was a paid, used answer."""
    assert app.statuses(codes) == {"succeeded": len(codes)}, app.output()[-3000:]
    answers: dict[str, int] = {}
    for code, _number, state, http_status, _error, _cost in app.attempts(codes):
        if http_status == 200 and state == "settled":
            answers[code] = answers.get(code, 0) + 1
    assert sorted(answers.values()) == [1] * len(codes)


def test_kill_9_of_one_worker_under_load_is_contained(app_factory):
    app = app_factory(AIQUEUE_WORKER_THREADS="10")
    app.start()
    app.sim_control(latency_ms=2500, stream_chunk_delay_ms=0, reset_counters=True)
    codes = app.submit(40)
    wait_for(lambda: app.sim_counters()["in_flight"] >= 15, timeout=30)
    victim, other = app.pid("worker:worker-1"), app.pid("worker:worker-2")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()

    # The web server keeps answering while the worker is down and comes back.
    answered = []
    while time.time() - killed_at < 8:
        answered.append(httpx.get(f"{app.base}/healthz", timeout=5).status_code)
        time.sleep(0.25)
    assert set(answered) == {200}
    wait_for(lambda: app.statuses(codes).get("succeeded") == len(codes), timeout=120)

    procs = app.processes()
    assert procs["worker:worker-1"]["pid"] != victim  # restarted
    assert procs["worker:worker-1"]["state"] == "RUNNING"
    assert procs["worker:worker-1"]["exits"] == 1
    assert procs["worker:worker-2"]["pid"] == other  # never touched
    # Logged ("exited unexpectedly", or "exited while starting" if it was killed within its
    # first 5 s, supervisord's startsecs).
    assert "worker:worker-1 exited" in app.output()
    # The other worker kept taking jobs while the first was down.
    late_starts = app.query(
        "SELECT COUNT(*) FROM jobs_jobevent WHERE to_status = 'running' AND data LIKE ? "
        "AND created_at > datetime(?, 'unixepoch')",
        (f"%worker-2.{other}%", killed_at),
    )[0][0]
    assert late_starts > 0
    # Each job the kill cut off ran again within 30 s of the kill.
    recovered = app.query(
        "SELECT e.job_id, MIN(s.created_at) FROM jobs_jobevent e JOIN jobs_jobevent s "
        "ON s.job_id = e.job_id AND s.to_status = 'running' AND s.created_at > e.created_at "
        "WHERE e.reason LIKE 'worker lost%' GROUP BY e.job_id"
    )
    assert len(recovered) >= 5
    rerun = app.query(
        "SELECT MAX(strftime('%s', s) + 0.0) FROM (SELECT MIN(s.created_at) AS s "
        "FROM jobs_jobevent e JOIN jobs_jobevent s ON s.job_id = e.job_id "
        "AND s.to_status = 'running' AND s.created_at > e.created_at "
        "WHERE e.reason LIKE 'worker lost%' GROUP BY e.job_id)"
    )[0][0]
    assert rerun - killed_at < 30
    # No job failed or went to review because of the kill, and none was paid twice for a
    # success; every call the simulator answered is in the ledger (the cut ones at their
    # worst case).
    succeeded_once(app, codes)
    attempts = app.attempts(codes)
    assert len(attempts) >= app.sim_counters()["requests_total"]
    lost = [a for a in attempts if a[2] == "unknown"]
    assert 1 <= len(lost) <= len(recovered)
    assert all(a[5] > 0 and a[4] == "outcome_unknown" for a in lost)


def test_ctrl_c_with_40_calls_in_flight_then_run_again_fails_nothing(app_factory):
    app = app_factory()
    app.start()
    app.sim_control(latency_ms=3000, stream_chunk_delay_ms=0, reset_counters=True)
    codes = app.submit(40)
    wait_for(lambda: app.sim_counters()["in_flight"] == 40, timeout=30)

    assert app.interrupt(timeout=60) == 0
    output = app.output()
    assert "stopped." in output
    assert app.statuses(codes).get("failed", 0) == 0
    assert app.statuses(codes).get("needs_review", 0) == 0
    # Stopped in order: the workers were down before the simulator and Redis went.
    log = (app.root / "var" / "log" / "supervisord.log").read_text()
    order = [log.index(f"stopped: {name}") for name in ("web", "worker-1", "simulator", "redis")]
    assert order[1] < order[2] < order[3], log[-2000:]

    app.start()  # the same copy, its Redis data and database, as an operator would
    wait_for(lambda: app.statuses(codes).get("succeeded") == len(codes), timeout=90)
    succeeded_once(app, codes)
    # None paid twice: the calls in flight at Ctrl-C finished within the workers' grace.
    assert len(app.attempts(codes)) == len(codes)


def test_embedded_redis_killed_and_restarted_workers_survive(app_factory):
    app = app_factory(AIQUEUE_WORKER_THREADS="10")
    app.start()
    app.sim_control(latency_ms=2000, stream_chunk_delay_ms=0)
    workers = {name: app.pid(name) for name in ("worker:worker-1", "worker:worker-2")}
    codes = app.submit(30)
    wait_for(lambda: app.sim_counters()["in_flight"] >= 15, timeout=30)
    redis = app.pid("redis")
    os.kill(redis, signal.SIGKILL)
    wait_for(lambda: app.statuses(codes).get("succeeded") == len(codes), timeout=120)
    assert app.processes()["redis"]["exits"] == 1  # it died, and was restarted once
    assert app.pid("redis") != redis
    assert {name: app.pid(name) for name in workers} == workers  # no worker quit
    assert all(app.processes()[name]["exits"] == 0 for name in workers)
    succeeded_once(app, codes)


def test_external_redis_gone_5_s_and_back_empty_workers_survive(app_factory, tmp_path):
    port = redis_server.free_port()
    redis = redis_server.start(port, tmp_path / "redis-a")
    app = app_factory(AIQUEUE_WORKER_THREADS="10", REDIS_URL=f"redis://127.0.0.1:{port}/0")
    try:
        app.redis_port = port
        app.start()
        app.sim_control(latency_ms=2000, stream_chunk_delay_ms=0)
        workers = {name: app.pid(name) for name in ("worker:worker-1", "worker:worker-2")}
        codes = app.submit(40)
        wait_for(lambda: app.sim_counters()["in_flight"] >= 18, timeout=30)
        redis.kill()  # a failover: gone for 5 s, then back without its data
        redis.wait()
        time.sleep(5)
        redis = redis_server.start(port, tmp_path / "redis-b")
        wait_for(lambda: app.statuses(codes).get("succeeded") == len(codes), timeout=120)
        assert {name: app.pid(name) for name in workers} == workers
        assert all(app.processes()[name]["exits"] == 0 for name in workers)
        succeeded_once(app, codes)
        logs = "".join((app.root / "var" / "log" / f"worker-{n}.log").read_text() for n in (1, 2))
        assert "quitting" not in logs
        # No false alarm: the jobs that finished after the wipe succeeded quietly.
        assert "Failed to retrieve status" not in logs
        assert "Redis is back" in logs
    finally:
        app.close()
        redis.terminate()
        try:
            redis.wait(timeout=10)
        except subprocess.TimeoutExpired:
            redis.kill()
