"""inflight: 1,000 slow AI calls with 100 in flight, one threaded process vs 100 processes.

    .venv/bin/python bench/inflight.py [--jobs 1000] [--concurrency 100] [--latency-ms 1000]
                                       [--quick]

The simulator answers after --latency-ms. Both sides run the same aiqueue pipeline
(runs.tasks.run_job: row, ledger, events) on the same Redis and SQLite database:

- aiqueue: ONE `manage.py worker --threads <concurrency>` process (runs.worker.Worker);
- floor: the same threaded process running jobs that only read their row, make the one
  provider call and write the answer (bench/floor.py): what any job with a real call reaches;
- stock: django-rq's `rqworker-pool --num-workers <concurrency>` (RQ's forking Worker, one job
  per process at a time).

Jobs are submitted first, then the workers start; throughput is jobs / (first start → last
finish), from the job rows. A side that has not finished after --limit s is stopped and scored
on what it finished in that time. Ideal = concurrency / latency. Memory is the peak total PSS of the
worker process tree (/proc/<pid>/smaps_rollup, children included), sampled every second.
--quick: 300 jobs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import floor  # noqa: E402
from bench.common import PYTHON, Stack, print_table, pss_kib  # noqa: E402


class PeakPss:
    """Samples the PSS of a process tree every second in a thread; `.peak_mib` at the end."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.peak_kib = max(self.peak_kib, pss_kib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def run_side(
    stack: Stack,
    workload,
    args: list[str],
    n: int,
    expect_workers: int,
    limit_s: float,
    *,
    enqueue=None,
) -> dict:
    """Run n jobs with these workers; give up after limit_s s (what finished is counted).
    The jobs are aiqueue's (submitted) unless `enqueue(stack, workload, n) -> pks` is given."""
    pks = stack.submit_jobs(workload, n) if enqueue is None else enqueue(stack, workload, n)
    process = stack.spawn("workers", args)
    stack.wait_until(lambda: stack.rq_workers() >= expect_workers, timeout=180, interval=0.5)
    sampler = PeakPss(process.pid)
    started = time.monotonic()
    try:
        stack.wait_until(
            lambda: stack.count_status(pks, "succeeded") == n, timeout=limit_s, interval=0.5
        )
        time.sleep(1.5)  # one more memory sample at steady state
        seconds = None
    except TimeoutError:
        seconds = time.monotonic() - started
    peak = sampler.stop()
    stack.kill_process(process)  # the pool's horses sit in process groups of their own
    done, span = stack.run_span(pks)
    if seconds is None:
        seconds = span
    import redis

    redis.Redis.from_url(stack.redis_url).flushdb()  # no leftovers for the other side
    return {"done": done, "seconds": seconds, "rate": done / seconds, "pss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="300 jobs")
    parser.add_argument(
        "--limit", type=float, default=180, help="seconds each side may take (default 180)"
    )
    options = parser.parse_args()
    n = 300 if options.quick else options.jobs
    c = options.concurrency
    ideal = c / (options.latency_ms / 1000)

    with Stack(sim_latency_ms=options.latency_ms) as stack:
        stack.django()
        workload = stack.make_workload("Bench inflight", max_output_tokens=40)
        threaded = run_side(
            stack,
            workload,
            [PYTHON, "manage.py", "worker", "--no-scheduler", "--threads", str(c)],
            n,
            1,
            options.limit,
        )
        floor_side = run_side(
            stack,
            workload,
            [PYTHON, "manage.py", "worker", "--no-scheduler", "--threads", str(c)],
            n,
            1,
            options.limit,
            enqueue=floor.enqueue,
        )
        pool = run_side(
            stack,
            workload,
            [PYTHON, "manage.py", "rqworker-pool", "high", "default", "low",
             "--num-workers", str(c), "-v", "0"],
            n,
            c,
            options.limit,
        )  # fmt: skip

    rows = []
    for name, r in (
        (f"aiqueue: 1 process x {c} threads", threaded),
        (f"floor: 1 process x {c} threads, call only", floor_side),
        (f"stock django-rq: rqworker-pool x {c}", pool),
    ):
        rows.append(
            [
                name,
                f"{r['done']}/{n}",
                f"{r['seconds']:.1f}",
                f"{r['rate']:.1f}",
                f"{100 * r['rate'] / ideal:.0f}%",
                f"{r['pss_mib']:.0f}",
            ]
        )
    print_table(
        ["workers", "succeeded", "seconds", "jobs/s", "% of ideal", "peak PSS MiB"],
        rows,
        title=f"inflight: {n} jobs, simulator {options.latency_ms} ms, concurrency {c}, "
        f"ideal {ideal:.0f} jobs/s",
    )
    speedup = threaded["rate"] / pool["rate"] if pool["rate"] else float("inf")
    print(
        f"memory: stock / aiqueue = {pool['pss_mib'] / threaded['pss_mib']:.1f}x; "
        f"throughput: aiqueue / stock = {speedup:.2f}x"
    )


if __name__ == "__main__":
    main()
