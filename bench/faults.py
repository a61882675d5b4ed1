"""Faults: what each fault costs aiqueue, and what stock RQ does with the same worker kill.

    .venv/bin/python bench/faults.py            # every scenario (~4 min)
    .venv/bin/python bench/faults.py --only kill,rq-kill
    options: --jobs N --latency-ms L --threads T --keep (keep temp dirs and logs)

Each scenario runs in its own child process with a fresh stack (bench/common.py: Redis,
simulator, SQLite, two worker processes × T threads, default heartbeat / stale / reconcile
settings), submits N jobs at once and breaks something while calls are in flight:

- kill: SIGKILL of one of the two workers; a replacement starts at once, as ./run's
  supervisor does (it restarts a worker about a second after it died);
- rq-kill: the same kill against stock RQ: 2 × T `rq worker` processes (SimpleWorker, one job
  each, so as many calls in flight), jobs that make the same HTTP call; half of the processes
  are killed and as many started again;
- stall: SIGSTOP of one worker for 27 s with its calls in flight (the provider's read
  timeout is 30 s, as the demo's), then SIGCONT;
- redis: Redis killed, back after 5 s on the same port and empty (a failover without
  persistence);
- stop: SIGTERM of both workers (a deploy, Ctrl-C of ./run), then two new workers.

Per scenario: seconds from the fault until every job has succeeded ("whole again"), jobs
failed or sent to review, jobs paid twice (more than one call charged for one job), and the
ledger's rows against the calls the simulator received. For stock RQ there is no ledger: the
row counts the jobs RQ abandoned (left in its started registry, to be moved to the failed
registry once their heartbeat expires; RQ runs none of them again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from bench.common import PYTHON, Stack, print_table  # noqa: E402

SCENARIOS = ("kill", "rq-kill", "stall", "redis", "stop")


def _aiqueue(args: argparse.Namespace) -> dict:
    with Stack(sim_latency_ms=args.latency_ms, keep=args.keep) as stack:
        stack.django()
        from django.db.models import Count, Q

        from jobs.models import Attempt, Job

        workload = stack.make_workload("Faults bench", max_output_tokens=40, max_attempts=3)
        provider = workload.provider
        provider.read_timeout_s = 30
        provider.save()
        workers = stack.start_workers(2, threads=args.threads)
        stack.wait_until(lambda: stack.rq_workers() == 2, timeout=60)
        pks = stack.submit_jobs(workload, args.jobs)
        stack.wait_until(
            lambda: stack.sim_counters()["in_flight"] >= min(args.jobs, 2 * args.threads) * 0.8,
            timeout=60,
        )
        faulted = time.monotonic()
        if args.scenario == "kill":
            stack.kill_process(workers[0])
            time.sleep(1)  # the supervisor's restart delay
            stack.start_workers(1, threads=args.threads)
        elif args.scenario == "stall":
            os.kill(workers[0].pid, signal.SIGSTOP)
            time.sleep(27)
            os.kill(workers[0].pid, signal.SIGCONT)
        elif args.scenario == "redis":
            stack._redis.kill()
            stack._redis.wait()
            time.sleep(5)
            from aiqueue import redis_server

            stack._redis = redis_server.start(stack.redis_port, stack.tmp / "redis-after")
        elif args.scenario == "stop":
            for worker in workers:
                stack.stop_process(worker, grace=30)
            stack.start_workers(2, threads=args.threads)
        stack.wait_until(
            lambda: (
                stack.count_status(pks, "succeeded")
                + stack.count_status(pks, "needs_review")
                + stack.count_status(pks, "failed")
                == len(pks)
            ),
            timeout=300,
        )
        time.sleep(2)  # a late answer of a stalled worker is recorded
        jobs = Job.objects.filter(pk__in=pks)
        charged = (
            Attempt.objects.filter(job__in=jobs, cost__gt=0)
            .values("job")
            .annotate(n=Count("id"))
            .filter(n__gt=1)
        )
        alive = sum(1 for w in workers if w.poll() is None)
        return {
            "scenario": args.scenario,
            "whole_after_fault_s": time.monotonic() - faulted - 2,
            "failed": jobs.filter(Q(status="failed") | Q(status="needs_review")).count(),
            "lost": len(pks) - jobs.filter(status="succeeded").count(),
            "paid_twice": charged.count(),
            "ledger": Attempt.objects.filter(job__in=jobs).count(),
            "unknown": Attempt.objects.filter(job__in=jobs, state="unknown").count(),
            "superseded": Attempt.objects.filter(job__in=jobs, state="superseded").count(),
            "provider_calls": stack.sim_counters()["requests_total"],
            "workers_survived": alive if args.scenario in ("stall", "redis") else None,
        }


def _stock_rq(args: argparse.Namespace) -> dict:
    import redis
    from rq import Queue
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    with Stack(sim_latency_ms=args.latency_ms, keep=args.keep, migrate=False) as stack:
        conn = redis.Redis.from_url(stack.redis_url)
        queue = Queue("faults", connection=conn)
        n = 2 * args.threads

        def start(count: int) -> list[subprocess.Popen]:
            return [
                stack.spawn(
                    "rq",
                    [
                        PYTHON,
                        "-m",
                        "rq.cli",
                        "worker",
                        "--worker-class",
                        "rq.SimpleWorker",
                        "--url",
                        stack.redis_url,
                        "faults",
                    ],
                )  # fmt: skip
                for _ in range(count)
            ]

        procs = start(n)
        stack.wait_until(lambda: stack.rq_workers() == n, timeout=60)
        url = f"{stack.simulator_url}/v1/chat/completions"
        jobs = [
            queue.enqueue("bench.faults.rq_call", url, i, job_timeout=120, result_ttl=600)
            for i in range(args.jobs)
        ]
        stack.wait_until(lambda: stack.sim_counters()["in_flight"] >= n * 0.8, timeout=60)
        faulted = time.monotonic()
        for process in procs[: n // 2]:
            stack.kill_process(process)
        time.sleep(1)
        start(n // 2)
        finished = lambda: sum(1 for j in jobs if j.get_status(refresh=True) == "finished")  # noqa: E731
        stack.wait_until(lambda: queue.count == 0 and finished() + _started(jobs) == len(jobs), 120)
        done_at = time.monotonic()
        # Give RQ its chance: the jobs left "started" by the dead workers are not re-run.
        time.sleep(10)
        abandoned = _started(jobs)
        return {
            "scenario": "rq-kill",
            "whole_after_fault_s": None if abandoned else done_at - faulted,
            "failed": len(FailedJobRegistry(queue=queue)),
            "lost": len(jobs) - finished(),
            "abandoned": abandoned,
            "still_in_started_registry": len(StartedJobRegistry(queue=queue)),
            "paid_twice": 0,
            "ledger": None,
            "provider_calls": stack.sim_counters()["requests_total"],
        }


def _started(jobs) -> int:
    return sum(1 for j in jobs if j.get_status(refresh=True) == "started")


def rq_call(url: str, i: int) -> int:
    """The stock RQ job: the same one HTTP call an aiqueue job makes, nothing recorded."""
    import httpx

    body = {"model": "sim-small", "messages": [{"role": "user", "content": f"text {i}"}]}
    return httpx.post(url, json=body, timeout=30).status_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--latency-ms", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        result = _stock_rq(args) if args.scenario == "rq-kill" else _aiqueue(args)
        print("RESULT " + json.dumps(result))
        return 0

    rows = []
    for scenario in args.only.split(","):
        cmd = [PYTHON, __file__, "--scenario", scenario, "--jobs", str(args.jobs),
               "--latency-ms", str(args.latency_ms), "--threads", str(args.threads)]  # fmt: skip
        if args.keep:
            cmd.append("--keep")
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{scenario} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            continue
        result = json.loads(line[7:])
        result["bench_s"] = time.monotonic() - started
        rows.append(result)

    def whole(r: dict) -> str:
        if r["whole_after_fault_s"] is None:
            return f"never ({r['abandoned']} abandoned)"
        return f"{r['whole_after_fault_s']:.1f}"

    def ledger(r: dict) -> str:
        if r["ledger"] is None:
            return "no ledger"
        extra = [f"{r[k]} {k}" for k in ("unknown", "superseded") if r.get(k)]
        return f"{r['ledger']}" + (f" ({', '.join(extra)})" if extra else "")

    print_table(
        ["fault", "whole again (s)", "jobs failed", "jobs not done", "paid twice",
         "ledger rows", "provider calls"],
        [
            [r["scenario"], whole(r), r["failed"], r["lost"], r["paid_twice"], ledger(r),
             r["provider_calls"]]
            for r in rows
        ],
        title=f"{args.jobs} jobs, {args.latency_ms} ms per call, 2 workers x {args.threads}",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
