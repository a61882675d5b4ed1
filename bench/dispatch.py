"""dispatch: per-job overhead of the whole pipeline vs raw RQ, with a zero-latency provider.

    .venv/bin/python bench/dispatch.py [--jobs 2000] [--threads 20] [--quick]

aiqueue: jobs are submitted through the JSON API (uvicorn, Bearer token; 8 client threads),
then ONE `manage.py worker --threads N` process runs them end to end (row, admission, provider
call over HTTP to the simulator at 0 ms, Attempt ledger row, events, live updates). Rate =
jobs / (first start → last finish), from the job rows.

floor: the same worker process runs the same number of jobs that only read their row, make
the one provider call and write the answer (bench/floor.py): about the most any job with a real
provider call can reach here. Rate as for aiqueue.

raw RQ: the same number of no-op jobs (`os.getpid`) on a queue of the same Redis, run by RQ's
SimpleWorker (burst, in this process). Rate = jobs / wall time of the burst.

worker only: the same no-op jobs run by aiqueue's Worker with the same threads (burst,
in this process), timed as raw RQ: what the concurrent worker itself costs, without any job work.

Target: aiqueue ≥ 0.5× raw RQ per worker process. --quick: 300 jobs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import floor  # noqa: E402
from bench.common import Stack, print_table  # noqa: E402


def submit_via_api(base: str, key: str, workload: str, n: int, clients: int = 8) -> float:
    """Submit n jobs over HTTP from `clients` threads; returns the seconds it took."""
    counter = iter(range(n))
    lock = threading.Lock()
    errors: list[str] = []

    def loop() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                response = client.post(
                    "/api/jobs",
                    json={"workload": workload, "input": f"dispatch text {i}"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                if response.status_code != 202:
                    errors.append(f"{response.status_code} {response.text[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} submissions failed, first: {errors[0]}")
    return time.monotonic() - started


def run_worker(stack: Stack, pks: list[int], threads: int) -> tuple[int, float]:
    """One `manage.py worker --threads N` runs the queued jobs `pks`; (succeeded, span s)."""
    [worker] = stack.start_workers(1, threads=threads, args=["--no-scheduler"])
    stack.wait_until(lambda: stack.count_status(pks, "succeeded") == len(pks), timeout=900)
    stack.stop_process(worker)
    return stack.run_span(pks)


def noop_burst(redis_url: str, n: int, threads: int | None = None) -> float:
    """Seconds for a burst worker in this process to run n no-op jobs: RQ's SimpleWorker, or
    with `threads`, aiqueue's Worker."""
    import redis
    from rq import Queue
    from rq.worker import SimpleWorker

    from runs.worker import Worker

    connection = redis.Redis.from_url(redis_url)
    queue = Queue(f"bench-noop-{threads or 'simple'}", connection=connection)
    with connection.pipeline() as pipe:
        for _ in range(n):
            queue.enqueue("os.getpid", result_ttl=0, pipeline=pipe)
        pipe.execute()
    if threads is None:
        worker = SimpleWorker([queue], connection=connection)
    else:
        worker = Worker([queue], connection=connection, threads=threads)
    started = time.monotonic()
    worker.work(burst=True, logging_level="WARNING", with_scheduler=False)
    elapsed = time.monotonic() - started
    assert queue.count == 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="300 jobs")
    options = parser.parse_args()
    n = 300 if options.quick else options.jobs

    with Stack(sim_latency_ms=0) as stack:
        stack.django()
        workload = stack.make_workload("Bench dispatch", max_output_tokens=20)
        key = stack.api_token()
        web = stack.start_web(workers=1)
        submit_s = submit_via_api(web, key, workload.name, n)
        from jobs.models import Job

        pks = list(Job.objects.filter(workload=workload).values_list("pk", flat=True))
        done, span = run_worker(stack, pks, options.threads)
        aiqueue_rate = done / span
        floor_done, floor_span = run_worker(
            stack, floor.enqueue(stack, workload, n), options.threads
        )
        floor_rate = floor_done / floor_span
        raw_s = noop_burst(stack.redis_url, n)
        raw_rate = n / raw_s
        noop_s = noop_burst(stack.redis_url, n, threads=options.threads)

    print_table(
        ["pipeline", "jobs", "seconds", "jobs/s"],
        [
            [f"aiqueue, 1 worker process ({options.threads} threads)", done, span, aiqueue_rate],
            ["floor: same worker, provider call only", floor_done, floor_span, floor_rate],
            ["worker only: same worker, no-op jobs", n, noop_s, n / noop_s],
            ["raw RQ SimpleWorker, no-op jobs", n, raw_s, raw_rate],
        ],
        title=f"dispatch: {n} jobs, simulator at 0 ms (API submit took {submit_s:.1f} s, "
        f"{n / submit_s:.0f}/s)",
    )
    print(
        f"ratio aiqueue / raw RQ = {aiqueue_rate / raw_rate:.2f} (target >= 0.5); "
        f"floor / raw RQ = {floor_rate / raw_rate:.2f}; aiqueue / floor = "
        f"{aiqueue_rate / floor_rate:.2f}; worker only / raw RQ = {n / noop_s / raw_rate:.2f}"
    )


if __name__ == "__main__":
    main()
