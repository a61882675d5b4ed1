"""Scale-out, as docs/deploy.md describes it: 2 web processes + 3 workers on PostgreSQL and one
Redis. Jobs are submitted over the API to both web processes at once; while calls are in
flight one worker is SIGKILLed (and not replaced). Every job must end succeeded, once: one
"succeeded" event per job, one answered call per job in the ledger, and the ledger's rows equal
to the calls the provider received.

    .venv/bin/python bench/scaleout.py                       # 300 jobs
    .venv/bin/python bench/scaleout.py --jobs 1000 --postgres postgres://postgres@127.0.0.1:5432
    (tests/test_scaleout.py runs it with fewer jobs)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from bench.common import Stack, print_table  # noqa: E402

POSTGRES = "postgres://postgres@127.0.0.1:5432"
# Quicker than the defaults so the run is short; the mechanism is the same (docs/deploy.md).
FAST_RECOVERY = {
    "AIQUEUE_HEARTBEAT_INTERVAL": "1",
    "AIQUEUE_STALE_RUNNING_AFTER": "4",
    "AIQUEUE_RECONCILE_INTERVAL": "2",
    "AIQUEUE_LEASE_TTL": "3",
}


def run(*, jobs: int = 300, postgres: str = POSTGRES, latency_ms: int = 400, threads: int = 10,
        senders: int = 8, timeout: float = 300, keep: bool = False) -> dict:  # fmt: skip
    with Stack(
        sim_latency_ms=latency_ms,
        database_url=None,
        env={**FAST_RECOVERY, "BENCH_POSTGRES": postgres, "AIQUEUE_DB_POOL": "1"},
        keep=keep,
    ) as stack:
        stack.django()
        from django.db.models import Count, Q

        from jobs.models import Attempt, Job, JobEvent

        # A short timeout: a job the killed worker had taken from Redis but not started yet is
        # found by RQ's registry cleanup once its timeout has passed (see docs/deploy.md).
        workload = stack.make_workload(
            "Scale-out", max_output_tokens=40, max_attempts=3, timeout_s=15
        )
        token = stack.api_token()
        webs = [stack.start_web(), stack.start_web()]
        workers = stack.start_workers(3, threads=threads)
        stack.wait_until(lambda: stack.rq_workers() == 3, timeout=60)

        accepted: Counter[str] = Counter()
        codes: list[str] = []
        problems: list[str] = []
        lock = threading.Lock()

        def send(sender: int) -> None:
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
                for n in range(sender, jobs, senders):
                    base = webs[n % 2]
                    body = {"workload": workload.name, "input": f"Scale-out note number {n}."}
                    response = client.post(
                        f"{base}/api/jobs", json=body, headers={"Idempotency-Key": f"so-{n}"}
                    )
                    with lock:
                        if response.status_code == 202:
                            accepted[base] += 1
                            codes.append(response.json()["code"])
                        else:
                            problems.append(f"{response.status_code} {response.text[:100]}")

        started = time.monotonic()
        threads_ = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
        for thread in threads_:
            thread.start()

        # Kill the worker running the most jobs once calls are in flight.
        stack.wait_until(
            lambda: Job.objects.filter(status=Job.Status.RUNNING).count() >= threads, timeout=60
        )
        running_by = Counter(
            Job.objects.filter(status=Job.Status.RUNNING).values_list("run_by", flat=True)
        )
        victim = max(
            workers, key=lambda w: sum(n for r, n in running_by.items() if f"/{w.pid}/" in r)
        )
        held = sum(n for r, n in running_by.items() if f"/{victim.pid}/" in r)
        stack.kill_process(victim)
        for thread in threads_:
            thread.join()
        submitted = time.monotonic() - started

        pks = list(Job.objects.filter(code__in=codes).values_list("pk", flat=True))
        settled = [*Job.TERMINAL_STATUSES, Job.Status.NEEDS_REVIEW]
        try:
            stack.wait_until(
                lambda: Job.objects.filter(pk__in=pks, status__in=settled).count() == len(pks),
                timeout=timeout,
            )
        except TimeoutError:
            pass  # reported below: which jobs, and what they went through
        left = Job.objects.filter(pk__in=pks).exclude(status__in=settled)
        unsettled = [
            f"{j.code} {j.status} events={list(j.events.values_list('to_status', flat=True))}"
            for j in left[:5]
        ]
        done = time.monotonic() - started
        time.sleep(1)  # nothing more may land
        in_jobs = Q(job__pk__in=pks)
        answered_twice = (
            Attempt.objects.filter(in_jobs, http_status=200, state="settled")
            .values("job")
            .annotate(n=Count("id"))
            .filter(n__gt=1)
            .count()
        )
        succeeded_twice = (
            JobEvent.objects.filter(in_jobs, to_status="succeeded")
            .values("job")
            .annotate(n=Count("id"))
            .filter(n__gt=1)
            .count()
        )
        return {
            "jobs": jobs,
            "accepted": len(codes),
            "refused": problems[:5],
            "accepted_per_web": sorted(accepted.values()),
            "killed_worker_running": held,
            "succeeded": Job.objects.filter(pk__in=pks, status=Job.Status.SUCCEEDED).count(),
            "not_succeeded": Job.objects.filter(pk__in=pks).exclude(status="succeeded").count(),
            "unsettled": left.count(),
            "unsettled_examples": unsettled,
            "unsettled_never_started": left.filter(started_at__isnull=True).count(),
            "succeeded_twice": succeeded_twice,
            "answered_twice": answered_twice,
            "ledger_rows": Attempt.objects.filter(in_jobs).count(),
            "unknown_outcome": Attempt.objects.filter(in_jobs, state="unknown").count(),
            "provider_calls": stack.sim_counters()["requests_total"],
            "submit_s": round(submitted, 1),
            "all_done_s": round(done, 1),
            "workers_left": sum(1 for w in workers if w.poll() is None),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--latency-ms", type=int, default=400)
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300, help="for all jobs to settle (s)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(jobs=args.jobs, postgres=args.postgres, latency_ms=args.latency_ms,
                 threads=args.threads, timeout=args.timeout, keep=args.keep)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print_table(["measure", "value"], [[k, v] for k, v in result.items()])


if __name__ == "__main__":
    main()
