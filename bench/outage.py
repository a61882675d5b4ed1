"""Outage: a steady stream of jobs while the provider misbehaves for a while, then recovers.

    .venv/bin/python bench/outage.py                # four scenarios × two policies (~20 min)
    .venv/bin/python bench/outage.py --quick        # 20 s faults, 2 jobs/s (~8 min)
    options: --scenarios 503,outage,429,slow  --rate R (jobs/s)  --fault S  --latency-ms L
             --workers W --threads T --tail S --keep --debug

Scenarios (each one fault, switched on when the first job is submitted and off --fault s later,
through the simulator's /_control switches):

- 503:     half of the calls answer 503 (error_rate 0.5);
- outage:  every call answers 503 (outage);
- 429:     a 429 storm: 80 % of calls answer 429 with Retry-After: 5 s (rate_limit_rate 0.8);
- slow:    the provider answers 10× slower than usual (latency_ms × 10).

Each scenario runs once per policy, each run in a child process with a fresh stack (Redis, the
simulator, SQLite, W worker processes × T threads, RQ's scheduler), so both start from the same
state and see the same faults and the same arrival stream: `--rate` jobs a second for the
length of the fault (one job every 1/rate s, the first at t=0).

- aiqueue: the real retry layer with the provider's default settings (runs.retries: the retry
  budget, the circuit breaker with both its rules, waiting instead of failing on free failures,
  max 3 paid attempts per job);
- naive: bench/naive_retries.py, what a plain "retry 3 times with backoff" wrapper does:
  every call retried up to 3 times, no budget, no breaker, no parking, Retry-After ignored.

The bench waits until every job has an outcome, at most --tail s after the fault ends, and
reports provider calls per job (the simulator's own count), jobs failed (ended in review or
failed: no answer), jobs lost (no outcome by then; --debug says what they are doing), and the
time to drain after recovery (from the end of the fault to the last job's outcome; 0 when all
were done before it). Nobody touches the breaker: what resumes, resumes by itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from bench import naive_retries  # noqa: E402
from bench.common import PYTHON, Stack, print_table  # noqa: E402

FINAL = ("succeeded", "failed", "needs_review", "cancelled", "expired")
POLICIES = ("standard", "naive")
# name: (title, switches on, switches off); "latency" is filled in from --latency-ms.
SCENARIOS = {
    "503": ("50 % of calls answer 503", {"error_rate": 0.5}, {"error_rate": 0.0}),
    "outage": ("100 % outage (every call 503)", {"outage": True}, {"outage": False}),
    "429": (
        "429 storm: 80 % of calls, Retry-After 5 s",
        {"rate_limit_rate": 0.8, "retry_after_s": 5},
        {"rate_limit_rate": 0.0},
    ),
    "slow": ("provider 10× slower", {"latency_ms": "10x"}, {"latency_ms": "1x"}),
}
# The targets: calls per job at most this, no job failed, none lost.
TARGETS = {"503": 1.25, "outage": 1.1}


def switches(config: dict, latency_ms: int) -> dict:
    return {
        key: latency_ms * int(value[:-1]) if key == "latency_ms" else value
        for key, value in config.items()
    }


def run_one(args: argparse.Namespace) -> dict:
    _title, fault_on, fault_off = SCENARIOS[args.scenario]
    policy = naive_retries.POLICY if args.policy == "naive" else args.policy
    env = {"AIQUEUE_RETRY_POLICY": policy, "AIQUEUE_RECONCILE_INTERVAL": "5"}
    with Stack(sim_latency_ms=args.latency_ms, env=env, keep=args.keep) as stack:
        stack.django()
        from django.db.models import Count, Max, Min

        from jobs import services
        from jobs.models import Job, JobEvent

        workload = stack.make_workload("Outage bench", max_output_tokens=40, max_attempts=3)
        provider = workload.provider
        provider.read_timeout_s = 30
        provider.save()
        user = stack.user()
        stack.start_workers(args.workers, threads=args.threads)
        # The stream starts when every worker is taking jobs, so both policies see the fault.
        import django_rq
        from rq import Worker

        connection = django_rq.get_connection("default")
        stack.wait_until(lambda: len(Worker.all(connection=connection)) >= args.workers, 60)

        jobs = round(args.rate * args.fault)
        stack.sim_control(reset_counters=True, **switches(fault_on, args.latency_ms))
        started = time.monotonic()
        submitted = 0
        calls_in_fault = None
        finished_at = None
        next_check = 0.0
        while (elapsed := time.monotonic() - started) < args.fault + args.tail:
            while submitted < jobs and submitted / args.rate <= elapsed:
                services.do_submit_job(
                    workload=workload,
                    input_text=f"Meeting {submitted}: the team reviewed the roadmap and hiring.",
                    user=user,
                )
                submitted += 1
            if calls_in_fault is None and elapsed >= args.fault:
                stack.sim_control(**switches(fault_off, args.latency_ms))
                calls_in_fault = stack.sim_counters()["requests_total"]
            if submitted == jobs and calls_in_fault is not None and elapsed >= next_check:
                next_check = elapsed + 0.5
                if not Job.objects.exclude(status__in=FINAL).exists():
                    finished_at = elapsed
                    break
            time.sleep(0.05)
        if calls_in_fault is None:
            stack.sim_control(**switches(fault_off, args.latency_ms))

        if args.debug:
            _explain_unfinished(Job, connection)
            _timeline(provider)
        counters = stack.sim_counters()
        outcomes = dict(Job.objects.values_list("status").annotate(n=Count("id")))
        per_job = list(
            Job.objects.annotate(n=Count("attempts")).values_list("n", flat=True).order_by()
        )
        span = Job.objects.aggregate(first=Min("created_at"), last=Max("finished_at"))
        done_s = None
        if finished_at is not None:  # every job has an outcome: when the last one got it
            done_s = (span["last"] - span["first"]).total_seconds()
        failed_calls = sum(n for k, n in counters["by_outcome"].items() if k != "ok")
        return {
            "policy": args.policy,
            "scenario": args.scenario,
            "jobs": submitted,
            "calls": counters["requests_total"],
            "calls_in_fault": calls_in_fault or 0,
            "failed_calls": failed_calls,
            "most_calls": max(per_job, default=0),
            "parks": JobEvent.objects.filter(to_status="waiting").count(),
            "succeeded": outcomes.get("succeeded", 0),
            "failed": outcomes.get("needs_review", 0) + outcomes.get("failed", 0),
            "expired": outcomes.get("expired", 0),
            "lost": Job.objects.exclude(status__in=FINAL).count(),
            "drain_s": max(0.0, done_s - args.fault) if done_s is not None else None,
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


def _timeline(provider) -> None:
    """--debug: every call (seconds from the first job, job, its call number, status) and the
    breaker's transitions, on stderr."""
    from jobs.flow import breaker
    from jobs.models import Attempt, Job

    start = Job.objects.order_by("created_at").values_list("created_at", flat=True).first()
    index = {
        pk: i
        for i, pk in enumerate(Job.objects.order_by("created_at").values_list("pk", flat=True))
    }
    for at, job_id, number, status in Attempt.objects.order_by("started_at").values_list(
        "started_at", "job_id", "number", "http_status"
    ):
        print(
            f"{(at - start).total_seconds():7.2f} job {index[job_id]:3} #{number} {status}",
            file=sys.stderr,
        )
    for entry in reversed(breaker.status(provider, history=50).history):
        when = (entry["at"] - start).total_seconds()
        print(
            f"{when:7.2f} breaker {entry['from']} → {entry['to']}: {entry['reason']}",
            file=sys.stderr,
        )


def table(scenario: str, results: list[dict], args: argparse.Namespace) -> None:
    rows = [
        ("provider calls", *(r["calls"] for r in results)),
        ("calls per job", *(round(r["calls"] / r["jobs"], 3) for r in results)),
        (
            "  of which during the fault",
            *(round(r["calls_in_fault"] / r["jobs"], 3) for r in results),
        ),
        ("failed calls", *(r["failed_calls"] for r in results)),
        ("most calls for one job", *(r["most_calls"] for r in results)),
        ("parked (→ waiting)", *(r["parks"] for r in results)),
        ("succeeded", *(r["succeeded"] for r in results)),
        ("jobs failed (review / failed)", *(r["failed"] for r in results)),
        ("expired", *(r["expired"] for r in results)),
        ("jobs lost", *(r["lost"] for r in results)),
        ("drain after recovery (s)", *(_or_nan(r["drain_s"]) for r in results)),
    ]
    print_table(
        ["", "aiqueue", "naive (3 retries per call)"],
        rows,
        title=(
            f"{scenario}: {SCENARIOS[scenario][0]} for {args.fault:g} s; {results[0]['jobs']} "
            f"jobs at {args.rate:g}/s during it; {args.workers} workers × {args.threads} "
            f"threads, {args.latency_ms} ms latency"
        ),
    )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s faults at 2 jobs/s")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--policies", default=",".join(POLICIES), help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=None, help="jobs per second")
    parser.add_argument("--fault", type=float, default=None, help="seconds the fault lasts")
    parser.add_argument("--latency-ms", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tail", type=float, default=240, help="max seconds after the fault")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--debug", action="store_true", help="explain unfinished jobs")
    parser.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rate is None:
        args.rate = 2.0 if args.quick else 1.0
    if args.fault is None:
        args.fault = 20 if args.quick else 60

    if args.policy:  # a child: one scenario, one policy, JSON on the last line
        print(json.dumps(run_one(args)))
        return 0

    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    passthrough = [
        *("--rate", str(args.rate), "--fault", str(args.fault), "--tail", str(args.tail)),
        *("--latency-ms", str(args.latency_ms), "--workers", str(args.workers)),
        *("--threads", str(args.threads)),
        *(["--keep"] if args.keep else []),
        *(["--debug"] if args.debug else []),
    ]
    summary = []
    for scenario in scenarios:
        results = []
        for policy in args.policies.split(","):
            print(f"running {scenario} / {policy}...", flush=True)
            child = subprocess.run(
                [PYTHON, __file__, *passthrough, "--scenario", scenario, "--policy", policy],
                capture_output=True,
                text=True,
            )
            if child.returncode != 0:
                print(child.stdout[-2000:], child.stderr[-4000:], file=sys.stderr)
                return 1
            if args.debug:
                print(child.stderr[-4000:], file=sys.stderr)
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        if len(results) != len(POLICIES):
            print(json.dumps(results, indent=1))  # one policy only (a debugging run)
            continue
        table(scenario, results, args)
        summary.append((scenario, results))

    rows = []
    for scenario, (ours, naive) in summary:
        per_job = ours["calls"] / ours["jobs"]
        target = TARGETS.get(scenario)
        met = ""
        if target is not None:
            ok = per_job <= target and ours["failed"] + ours["expired"] + ours["lost"] == 0
            met = f"≤ {target} calls/job, 0 failed, 0 lost: {'met' if ok else 'NOT met'}"
        rows.append(
            (
                scenario,
                f"{per_job:.3f} / {naive['calls'] / naive['jobs']:.3f}",
                f"{ours['failed']} / {naive['failed']}",
                f"{ours['lost']} / {naive['lost']}",
                f"{_or_nan(ours['drain_s']):.1f} / {_or_nan(naive['drain_s']):.1f}",
                met,
            )
        )
    print_table(
        ["scenario", "calls/job", "failed", "lost", "drain (s)", "target (aiqueue)"],
        rows,
        title="summary: aiqueue / naive",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
