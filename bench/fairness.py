"""fairness: another token's few jobs while one token floods a priority, FIFO vs fair share.

    .venv/bin/python bench/fairness.py [--flood 2000] [--few 20] [--latency-ms 500]
                                       [--workers 2] [--threads 20] [--quick]

One token ("flood") queues --flood default-priority jobs, then another ("few") submits --few.
Measured: the few jobs' completion time, from their first submission to the last one
succeeded, with the flood queued ahead and alone on an idle queue, and their ratio (target
<= 2x with fair share). The same run is made with AIQUEUE_FAIR_SHARE off (first in, first out:
the order before fair share) and on. The flood is queued while no worker runs, so it is all
ahead of the few jobs when the workers start; "flood drained" is from then to the flood's last
success, "flood submitted" the time this process took to submit it (rows, events, pushes).
Jobs are submitted in this process (jobs.services.do_submit_job, as the API does) and run by
--workers `manage.py worker --threads` processes against the simulator.
--quick: a flood of 400.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, print_table  # noqa: E402


def submit(workload, token, n: int, prefix: str) -> list[int]:
    from jobs import services

    return [
        services.do_submit_job(
            workload=workload, input_text=f"{prefix} {i}", user=token.user, api_token=token
        )[0].pk
        for i in range(n)
    ]


def completion_s(pks: list[int]) -> float:
    """From the first job's submission to the last one's success."""
    from django.db.models import Max, Min

    from jobs.models import Job

    span = Job.objects.filter(pk__in=pks).aggregate(
        first=Min("created_at"), last=Max("finished_at")
    )
    return (span["last"] - span["first"]).total_seconds()


def one_side(stack: Stack, workload, tokens, fair: bool, options) -> dict[str, float]:
    from django.conf import settings

    flood_token, few_token = tokens
    # The push is made by whoever enqueues: this process, and the workers for re-enqueues.
    settings.AIQUEUE_FAIR_SHARE = fair
    env = {"AIQUEUE_FAIR_SHARE": "true" if fair else "false"}

    def start() -> list:
        workers = stack.start_workers(options.workers, threads=options.threads, env=env)
        stack.wait_until(lambda: stack.rq_workers() >= options.workers, timeout=60)
        return workers

    def stop(workers: list) -> None:
        for worker in workers:
            stack.stop_process(worker, grace=10)
        stack.wait_until(lambda: stack.rq_workers() == 0, timeout=60)

    workers = start()
    alone = submit(workload, few_token, options.few, "alone")
    stack.wait_until(lambda: stack.count_status(alone, "succeeded") == len(alone), timeout=300)
    stop(workers)

    submitting = time.monotonic()
    flood = submit(workload, flood_token, options.flood, "flood")
    submitted = time.monotonic() - submitting
    workers = start()
    started = time.monotonic()
    few = submit(workload, few_token, options.few, "few")
    stack.wait_until(lambda: stack.count_status(few, "succeeded") == len(few), timeout=900)
    stack.wait_until(lambda: stack.count_status(flood, "succeeded") == len(flood), timeout=900)
    drained = time.monotonic() - started
    stop(workers)
    return {
        "alone": completion_s(alone),
        "flood": completion_s(few),
        "drained": drained,
        "submitted": submitted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--few", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.quick:
        options.flood = 400

    with Stack(sim_latency_ms=options.latency_ms) as stack:
        stack.django()
        from jobs.models import ApiToken

        workload = stack.make_workload("Bench fairness", max_output_tokens=40)
        for name in ("flood", "few"):
            stack.api_token(name)
        tokens = [ApiToken.objects.get(user__username=name) for name in ("flood", "few")]
        sides = [
            ("FIFO (AIQUEUE_FAIR_SHARE=false)", one_side(stack, workload, tokens, False, options)),
            ("fair share", one_side(stack, workload, tokens, True, options)),
        ]

    rows = [
        [
            name,
            f"{side['alone']:.2f}",
            f"{side['flood']:.2f}",
            f"{side['flood'] / side['alone']:.1f}x",
            f"{side['drained']:.1f}",
            f"{side['submitted']:.1f}",
        ]
        for name, side in sides
    ]
    print_table(
        ["order", f"{options.few} jobs alone s", f"{options.few} jobs behind the flood s",
         "ratio", "flood drained s", "flood submitted s"],
        rows,
        title=f"fairness: {options.few} jobs of one token while another's {options.flood} are "
        f"queued (default priority), simulator {options.latency_ms} ms, {options.workers} "
        f"workers x {options.threads} threads",
    )  # fmt: skip
    print("target: ratio <= 2x with fair share")


if __name__ == "__main__":
    main()
