"""Spike with caps (issue #4): a burst of submissions against a provider capped at 20 in-flight
calls, with a budget, while the simulator answers in 2 s.

    .venv/bin/python bench/spike_caps.py            # 1,000 jobs (~2.5 min)
    .venv/bin/python bench/spike_caps.py --quick    # 200 jobs (~40 s)
    options: --jobs N --cap C --latency-ms L --workers W --threads T --clients K
             --web-workers U --keep (keep the temp dir and logs)

It starts its own stack (Redis on a free port, the simulator, a fresh SQLite DB, uvicorn,
W worker processes × T threads, RQ's scheduler in them), then submits N jobs through the JSON
API from K client threads at once, and measures:

- accept latency: POST /api/jobs → 202, per request, at the client (p50 / p99 / max);
- peak in-flight provider calls: the simulator's own counter (must stay <= the cap);
- completion time of the whole burst vs the ideal N × latency / cap;
- spend vs cap: a global budget whose cap fits the worst case of every job; the highest
  spent + reserved sampled during the run, and the final spend (ledger = sum of attempts).

Workers outnumber the cap on purpose (W × T > C), so the cap, not the worker count, limits
throughput; jobs that find the cap full are parked and woken as slots free.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import httpx  # noqa: E402

from bench.common import PYTHON, REPO, Stack, percentile, print_table  # noqa: E402

FINAL = ("succeeded", "failed", "needs_review", "cancelled", "expired")


def worker_supports_threads() -> bool:
    result = subprocess.run(
        [PYTHON, "manage.py", "worker", "--help"], cwd=REPO, capture_output=True, text=True
    )
    return "--threads" in result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 jobs")
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 200

    env = {"AIQUEUE_RECONCILE_INTERVAL": "5", "AIQUEUE_CAPACITY_RECHECK": "60"}
    with Stack(sim_latency_ms=args.latency_ms, env=env, keep=args.keep) as stack:
        stack.django()
        from django.db.models import Count, Max, Min, Sum

        from jobs.flow import budgets
        from jobs.models import Attempt, Budget, Job

        workload = stack.make_workload("Spike bench", max_output_tokens=40)
        provider = workload.provider
        provider.max_concurrency = args.cap
        provider.read_timeout_s = 30
        provider.save()
        text = "Spike: summarize the weekly operations report for the leadership team."
        worst = budgets.estimate(workload, text)
        cap_usd = (worst.usd * args.jobs).quantize(Decimal("0.0001")) + Decimal("0.0001")
        budget = Budget.objects.create(name="Spike bench budget", cap_usd=cap_usd)
        token = stack.api_token()
        web = stack.start_web(workers=args.web_workers)

        if worker_supports_threads():
            stack.start_workers(args.workers, threads=args.threads)
            runners = f"{args.workers} processes × {args.threads} threads"
        else:
            # Without the concurrent worker: one job per process, so start more processes.
            count = args.cap + 4
            stack.start_workers(1)
            stack.start_workers(count - 1, args=["--no-scheduler"])
            runners = f"{count} processes"
        time.sleep(4)  # let the workers register before the burst
        stack.sim_reset_counters()

        # Sample spent + reserved while the burst runs.
        highest = {"nanos": 0}
        stop = threading.Event()

        def sample() -> None:
            from django.db import connection

            try:
                while not stop.wait(0.5):
                    row = Budget.objects.filter(pk=budget.pk).values(
                        "spent_nanos", "reserved_nanos"
                    )[0]
                    highest["nanos"] = max(
                        highest["nanos"], row["spent_nanos"] + row["reserved_nanos"]
                    )
            finally:
                connection.close()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        latencies: list[float] = []
        refused: list[int | str] = []
        headers = {"Authorization": f"Bearer {token}"}

        def post(i: int, client: httpx.Client) -> None:
            started = time.monotonic()
            try:
                status = client.post(
                    "/api/jobs",
                    json={"workload": workload.name, "input": f"{text[:-5]}{i:05d}"},
                    headers=headers,
                ).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(time.monotonic() - started)
            if status != 202:
                refused.append(status)

        clients = [httpx.Client(base_url=web, timeout=60) for _ in range(args.clients)]
        burst_start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            for i in range(args.jobs):
                pool.submit(post, i, clients[i % args.clients])
        accept_s = time.monotonic() - burst_start
        for client in clients:
            client.close()

        timeout = args.jobs * args.latency_ms / 1000 / args.cap * 3 + 120
        stack.wait_until(
            lambda: Job.objects.filter(status__in=FINAL).count() >= args.jobs - len(refused),
            timeout=timeout,
            interval=1,
        )
        stop.set()
        sampler.join(timeout=5)
        counters = stack.sim_counters()
        times = Job.objects.aggregate(first=Min("created_at"), last=Max("finished_at"))
        completion_s = (times["last"] - times["first"]).total_seconds()
        ideal_s = args.jobs * args.latency_ms / 1000 / args.cap
        statuses = dict(Job.objects.values_list("status").annotate(n=Count("id")))
        budget.refresh_from_db()
        ledger = Attempt.objects.aggregate(total=Sum("cost"))["total"] or Decimal(0)
        # How busy the cap's slots were: provider-call time / (cap × completion time).
        call_s = (Attempt.objects.aggregate(ms=Sum("latency_ms"))["ms"] or 0) / 1000
        busy = call_s / (args.cap * completion_s)
        parked = Job.objects.filter(events__reason__startswith="concurrency cap full").distinct()

        print(
            f"\nspike with caps: {args.jobs} jobs, simulator {args.latency_ms} ms, "
            f"provider cap {args.cap}, workers {runners}, {args.clients} API clients, "
            f"{args.web_workers} uvicorn workers, SQLite\n"
        )
        print_table(
            ["metric", "measured", "reference"],
            [
                ["accept latency p50", f"{percentile(latencies, 50) * 1000:.0f} ms", ""],
                ["accept latency p99", f"{percentile(latencies, 99) * 1000:.0f} ms", ""],
                ["accept latency max", f"{max(latencies) * 1000:.0f} ms", ""],
                ["burst accepted in", f"{accept_s:.1f} s", f"{args.jobs / accept_s:.0f} jobs/s"],
                [
                    "not accepted (by status)",
                    ", ".join(f"{c}: {n}" for c, n in sorted(Counter(refused).items())) or "0",
                    "0",
                ],
                ["peak in-flight calls", counters["peak_in_flight"], f"cap {args.cap}"],
                ["provider calls", counters["requests_total"], f"{args.jobs} jobs"],
                ["completion time", f"{completion_s:.1f} s", f"ideal {ideal_s:.0f} s"],
                ["completion vs ideal", f"{completion_s / ideal_s:.2f}×", "1.00×"],
                ["cap slots busy", f"{busy:.0%}", "100%"],
                [
                    "mean provider call",
                    f"{call_s / max(1, counters['requests_total']):.2f} s",
                    f"{args.latency_ms / 1000:.2f} s",
                ],  # fmt: skip
                ["jobs parked on the cap", parked.count(), ""],
                ["outcomes", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())), ""],
                ["highest spent + reserved", f"${highest['nanos'] / 1e9:.6f}", f"cap ${cap_usd}"],
                ["final spend (budget)", f"${budget.spent_usd}", f"cap ${cap_usd}"],
                ["final spend (ledger)", f"${ledger:.8f}", ""],
                ["reserved left", f"${budget.reserved_usd}", "$0"],
            ],
        )


if __name__ == "__main__":
    main()
