"""peers: aiqueue's worker beside arq and Celery with a gevent pool, same machine, same simulator.

    .venv/bin/python bench/peers.py [--jobs 1000] [--in-flight 100,1000] [--latency-ms 1000]
                                    [--quick] [--limit 240] [--sides aiqueue,floor,arq,celery]

Issue #22's T5. For each in-flight level, each side runs the same number of jobs against the
simulator at --latency-ms, one worker process each, one side after the other:

- aiqueue: `manage.py worker --concurrency N`, the full pipeline (admission, budgets, the
  write-ahead ledger, events, live checks, RQ's bookkeeping);
- floor: the same worker process running jobs that only read their row, make the call and
  write the answer (bench/floor.py);
- arq: `arq` with `max_jobs = N` (asyncio, httpx.AsyncClient, poll delay 0.05 s);
- celery: `celery worker -P gevent -c N` (requests, Redis broker, no result backend).

A peer job makes the one call (POST /v1/chat/completions) and writes its answer onto its job
row with one SQL statement (bench/peer_jobs.py); the rows are made first and the jobs queued
before the worker starts, so the queue never runs dry. Throughput is jobs / (first start → last
finish) from the rows, as in the other scenarios; ideal = N / latency. CPU per job is the worker
process tree's utime + stime over the run, less what the same command costs to start and sit
idle until its CPU settles (measured just before, on an empty queue); memory is the peak PSS
sampled every second. arq and Celery each run in a virtualenv of their own under var/ (made
on first use from the package index; neither is a dependency of aiqueue).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import floor  # noqa: E402
from bench.common import PYTHON, REPO, Stack, cpu_seconds, print_table  # noqa: E402
from bench.inflight import PeakPss  # noqa: E402

# One virtualenv per peer: arq 0.28 wants redis-py < 6, Celery 5.7's kombu >= 6.1.
PEER_PACKAGES = {
    "arq": ["arq==0.28.0", "httpx"],
    "celery": ["celery[redis]==5.7.0", "gevent==26.9.0", "requests", "packaging"],
}
# A side whose count of finished jobs has not moved for this long is done with what it could.
STUCK_S = 20


def peer_python(kind: str) -> str:
    venv = REPO / "var" / f"bench-peers-{kind}"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {kind}'s virtualenv in {venv} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[kind]], check=True
        )  # fmt: skip
    return str(python)


def wait_idle(pid: int, timeout: float = 60) -> float:
    """Wait until the process tree's CPU settles (under 20 ms in a second); its CPU then."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - before < 0.02:
            return now
        before = now
    return before


class Side:
    def __init__(self, name: str, args: list[str], env: dict[str, str], enqueue) -> None:
        self.name, self.args, self.env, self.enqueue = name, args, env, enqueue


def peer_enqueue(kind: str, python: str, env: dict[str, str]):
    def enqueue(stack: Stack, workload, n: int) -> list[int]:
        pks = floor.make_rows(workload, n)
        with tempfile.NamedTemporaryFile("w", suffix=".pks", delete=False) as listing:
            listing.write("\n".join(map(str, pks)))
        subprocess.run(
            [python, str(REPO / "bench" / "peer_jobs.py"), "enqueue", kind, listing.name],
            env={**stack.env, **env}, check=True, cwd=REPO / "bench",
        )  # fmt: skip
        os.unlink(listing.name)
        return pks

    return enqueue


def submit(stack: Stack, workload, n: int) -> list[int]:
    return stack.submit_jobs(workload, n)


def make_side(name: str, c: int, peer_env: dict[str, str]) -> Side:
    if name in ("aiqueue", "floor"):
        args = [PYTHON, "manage.py", "worker", "--no-scheduler", "--concurrency", str(c)]
        return Side(name, args, {}, submit if name == "aiqueue" else floor.enqueue)
    python = peer_python(name)
    env = {**peer_env, "PEER_KIND": name}
    if name == "arq":
        args = [python, "-m", "arq", "peer_jobs.WorkerSettings"]
    elif name == "celery":
        args = [python, "-m", "celery", "-A", "peer_jobs", "worker", "-P", "gevent",
                "-c", str(c), "-l", "warning", "--without-heartbeat", "--without-gossip",
                "--without-mingle"]  # fmt: skip
    else:
        raise SystemExit(f"unknown side {name!r}")
    return Side(name, args, env, peer_enqueue(name, python, env))


def run(stack: Stack, workload, side: Side, n: int, limit_s: float) -> dict:
    import redis

    conn = redis.Redis.from_url(stack.redis_url)
    # What the command costs to start and sit idle, on an empty queue.
    idle = stack.spawn(f"{side.name}-idle", side.args, env=side.env)
    idle_cpu = wait_idle(idle.pid)
    stack.kill_process(idle)
    conn.flushdb()

    pks = side.enqueue(stack, workload, n)
    process = stack.spawn(side.name, side.args, env=side.env)
    sampler = PeakPss(process.pid)
    last_cpu = 0.0
    deadline = time.monotonic() + limit_s
    done, moved = 0, time.monotonic()
    while time.monotonic() < deadline:
        last_cpu = cpu_seconds(process.pid) or last_cpu
        now_done = stack.count_status(pks, "succeeded")
        if now_done == n:
            break
        if now_done != done:
            done, moved = now_done, time.monotonic()
        elif time.monotonic() - moved > STUCK_S:
            break  # the rest failed or was lost (a peer without retries): scored on what ran
        stack.check_alive()
        time.sleep(0.5)
    last_cpu = max(last_cpu, cpu_seconds(process.pid))
    peak = sampler.stop()
    stack.kill_process(process)
    done, span = stack.run_span(pks)
    conn.flushdb()
    return {
        "done": done,
        "seconds": span,
        "rate": done / span if span == span and span > 0 else 0.0,
        "cpu_ms": 1000 * max(0.0, last_cpu - idle_cpu) / max(done, 1),
        "pss_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--in-flight", default="100,1000")
    parser.add_argument("--latency-ms", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="300 jobs")
    parser.add_argument("--limit", type=float, default=240, help="seconds a side may take")
    parser.add_argument("--sides", default="aiqueue,floor,arq,celery")
    options = parser.parse_args()
    n = 300 if options.quick else options.jobs
    levels = [int(level) for level in options.in_flight.split(",")]
    wanted = options.sides.split(",")

    results: dict[int, list[tuple[str, dict]]] = {}
    with Stack(sim_latency_ms=options.latency_ms) as stack:
        stack.django()
        workload = stack.make_workload("Bench peers", max_output_tokens=40)
        sqlite_path = stack.database_url.removeprefix("sqlite:///")
        if stack.database_url.startswith("postgres"):
            raise SystemExit("peers runs on SQLite only (the peers' one statement is sqlite3)")
        for c in levels:
            peer_env = {
                "PEER_REDIS_URL": stack.redis_url,
                "PEER_SIM_URL": stack.simulator_url,
                "PEER_SQLITE": sqlite_path,
                "PEER_CONCURRENCY": str(c),
                "PYTHONPATH": str(REPO / "bench"),
                "DJANGO_SETTINGS_MODULE": "",  # Celery would look for Django fix-ups
            }
            for name in wanted:
                side = make_side(name, c, peer_env)
                print(f"{name} at {c} in flight ...", file=sys.stderr)
                results.setdefault(c, []).append(
                    (name, run(stack, workload, side, n, options.limit))
                )

    for c, rows in results.items():
        ideal = c / (options.latency_ms / 1000)
        table = []
        for name, r in rows:
            table.append(
                [
                    name,
                    f"{r['done']}/{n}",
                    f"{r['seconds']:.1f}",
                    f"{r['rate']:.1f}",
                    f"{100 * r['rate'] / ideal:.0f}%",
                    f"{r['cpu_ms']:.2f}",
                    f"{r['pss_mib']:.0f}",
                ]
            )
        print_table(
            ["side", "succeeded", "seconds", "jobs/s", "% of ideal", "CPU ms/job", "peak PSS MiB"],
            table,
            title=f"peers: {n} jobs, simulator {options.latency_ms} ms, {c} in flight, "
            f"ideal {ideal:.0f} jobs/s",
        )
        best = max((r["rate"] for name, r in rows if name in ("arq", "celery")), default=0)
        ours = dict(rows).get("aiqueue")
        cheapest = min(
            (r["cpu_ms"] for name, r in rows if name in ("arq", "celery") and r["done"]),
            default=0,
        )
        if ours and best and cheapest:
            print(
                f"aiqueue / best peer throughput {ours['rate'] / best:.2f}x; "
                f"aiqueue CPU per job / cheapest peer's {ours['cpu_ms'] / cheapest:.2f}x"
            )


if __name__ == "__main__":
    main()
