"""Outage: N jobs while the provider fails half of its calls with 503 for a while, then recovers.

    .venv/bin/python bench/outage.py            # 200 jobs, 60 s of 50 % 503s (~4 min)
    .venv/bin/python bench/outage.py --quick    # 60 jobs, 20 s outage (~1.5 min)
    options: --jobs N --outage S --error-rate R --latency-ms L --workers W --threads T
             --breaker-threshold K --cooldown S --keep (keep temp dirs and logs)

Each policy runs in its own child process with a fresh stack (Redis, simulator, SQLite,
W worker processes × T threads, RQ's scheduler), so both start from the same state:

- aiqueue: the real retry layer (jobs.retries): backoff with full jitter, Retry-After, the
  retry budget (10 % of recent calls, floor 3/min) and the circuit breaker per provider,
  parking jobs instead of hammering, max 3 attempts per job;
- naive: the same code with AIQUEUE_RETRY_POLICY=naive, i.e. what a plain "retry 3 times with
  backoff" wrapper does: every call retried up to 3 times, no budget, no breaker, no parking.

All jobs are submitted at once at t=0, when the outage starts. The bench waits until every job
has an outcome (succeeded, failed, or needs_review: handed to a human), at most --tail s after
the outage, and reports provider calls per job (the simulator's own count), the outcomes, and
jobs lost (no outcome by then; --debug prints what they are doing). The breaker defaults here
(3 failures, 20 s cooldown) are the bench's provider settings, not the model's defaults (5, 30 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from bench.common import PYTHON, Stack, print_table  # noqa: E402

FINAL = ("succeeded", "failed", "needs_review", "cancelled", "expired")


def run_policy(args: argparse.Namespace) -> dict:
    env = {
        "AIQUEUE_RETRY_POLICY": args.policy,
        "AIQUEUE_RECONCILE_INTERVAL": "5",
    }
    with Stack(sim_latency_ms=args.latency_ms, env=env, keep=args.keep) as stack:
        stack.django()
        from django.db.models import Count

        from jobs import services
        from jobs.models import Attempt, Job, JobEvent

        workload = stack.make_workload("Outage bench", max_output_tokens=40, max_attempts=3)
        provider = workload.provider
        provider.breaker_failure_threshold = args.breaker_threshold
        provider.breaker_cooldown_s = args.cooldown
        provider.read_timeout_s = 30
        provider.save()
        user = stack.user()
        stack.start_workers(args.workers, threads=args.threads)
        # The burst starts when every worker is taking jobs, so both policies see the outage.
        import django_rq
        from rq import Worker

        connection = django_rq.get_connection("default")
        stack.wait_until(lambda: len(Worker.all(connection=connection)) >= args.workers, 60)

        stack.sim_control(error_rate=args.error_rate, error_status=503, reset_counters=True)
        started = time.monotonic()
        for i in range(args.jobs):
            services.do_submit_job(
                workload=workload,
                input_text=f"Meeting {i}: the team reviewed the roadmap and the hiring plan.",
                user=user,
            )
        recovered = False
        deadline = started + args.outage + args.tail
        finished_at = None
        while time.monotonic() < deadline:
            if not recovered and time.monotonic() - started >= args.outage:
                stack.sim_control(error_rate=0.0)
                recovered = True
            if not Job.objects.exclude(status__in=FINAL).exists():
                finished_at = time.monotonic() - started
                break
            time.sleep(0.5)
        if not recovered:
            stack.sim_control(error_rate=0.0)

        if args.debug:
            _explain_unfinished(Job, connection)
        counters = stack.sim_counters()
        outcomes = dict(Job.objects.values_list("status").annotate(n=Count("id")))
        lost = Job.objects.exclude(status__in=FINAL).count()
        calls = counters["requests_total"]
        return {
            "policy": args.policy,
            "jobs": args.jobs,
            "calls": calls,
            "calls_per_job": calls / args.jobs,
            "failed_calls": counters["by_outcome"].get("error_503", 0),
            "attempt_rows": Attempt.objects.count(),
            "parks": JobEvent.objects.filter(to_status="waiting").count(),
            "succeeded": outcomes.get("succeeded", 0),
            "needs_review": outcomes.get("needs_review", 0),
            "failed": outcomes.get("failed", 0),
            "lost": lost,
            "all_done_s": finished_at,
        }


def _explain_unfinished(job_model, connection) -> None:
    """--debug: what the jobs without an outcome are doing, on stderr."""
    from django.utils import timezone
    from rq.job import Job as RQJob

    print(f"now {timezone.now():%H:%M:%S}; scheduler locks:", file=sys.stderr)
    print(sorted(k.decode() for k in connection.keys("rq:scheduler-lock:*")), file=sys.stderr)
    for job in job_model.objects.exclude(status__in=FINAL)[:20]:
        rq_status = connection.hget(RQJob.key_for(job.rq_job_id), "status")
        print(
            f"{job.code} {job.status} attempts={job.attempt_count} rq={rq_status} "
            f"resume={job.resume_at:%H:%M:%S} {job.wait_reason}"
            if job.resume_at
            else f"{job.code} {job.status} rq={rq_status}",
            file=sys.stderr,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 jobs, 20 s outage")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--outage", type=float, default=None, help="seconds of failures")
    parser.add_argument("--error-rate", type=float, default=0.5)
    parser.add_argument("--latency-ms", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--breaker-threshold", type=int, default=3)
    parser.add_argument("--cooldown", type=int, default=20)
    parser.add_argument("--tail", type=float, default=240, help="max seconds after the outage")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--debug", action="store_true", help="explain unfinished jobs")
    parser.add_argument("--policy", choices=["standard", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jobs is None:
        args.jobs = 60 if args.quick else 200
    if args.outage is None:
        args.outage = 20 if args.quick else 60

    if args.policy:  # a child: one policy, JSON on the last line
        print(json.dumps(run_policy(args)))
        return 0

    results = []
    passthrough = [a for a in sys.argv[1:] if a != "--quick"]
    passthrough += ["--jobs", str(args.jobs), "--outage", str(args.outage)]
    for policy in ("standard", "naive"):
        print(f"running {policy} ({args.jobs} jobs, {args.outage:g} s outage)...", flush=True)
        child = subprocess.run(
            [PYTHON, __file__, *passthrough, "--policy", policy],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            print(child.stdout[-2000:], child.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))

    rows = [
        ("provider calls", *(r["calls"] for r in results)),
        ("calls per job", *(round(r["calls_per_job"], 3) for r in results)),
        ("failed calls (503)", *(r["failed_calls"] for r in results)),
        ("ledger rows (Attempt)", *(r["attempt_rows"] for r in results)),
        ("parked (→ waiting)", *(r["parks"] for r in results)),
        ("succeeded", *(r["succeeded"] for r in results)),
        ("needs review", *(r["needs_review"] for r in results)),
        ("failed", *(r["failed"] for r in results)),
        ("jobs lost", *(r["lost"] for r in results)),
        ("all jobs done after (s)", *(r["all_done_s"] or float("nan") for r in results)),
    ]
    print_table(
        ["", "aiqueue (budget + breaker + parking)", "naive (3 retries per call)"],
        rows,
        title=(
            f"outage: {args.jobs} jobs, {args.error_rate:.0%} of calls fail with 503 for "
            f"{args.outage:g} s, then recovery; {args.workers} workers × {args.threads} threads, "
            f"{args.latency_ms} ms latency; breaker {args.breaker_threshold} failures / "
            f"{args.cooldown} s cooldown"
        ),
    )
    aiqueue = results[0]
    ok = aiqueue["lost"] == 0 and aiqueue["calls_per_job"] <= 1.25
    print(f"\ntarget (aiqueue ≤ 1.25 calls/job, 0 lost): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
