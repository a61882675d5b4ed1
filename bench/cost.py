"""Cost ceiling (issue #24): what a job reserves vs what its call really costs, per input family.

    .venv/bin/python bench/cost.py             # 30 jobs per family (~30 s)
    .venv/bin/python bench/cost.py --jobs 10   # quicker
    options: --jobs N --max-output T --keep (keep the temp dir and logs)

It starts its own stack (Redis, the simulator, which counts tokens as a byte-level BPE
tokenizer does, a fresh SQLite DB, one threaded worker), submits N summarize jobs for each
input family (English, code, numbers, CJK, emoji), runs them, and reads the ledger. For every
job it sets the reservation aiqueue makes (jobs.costs: one token per UTF-8 byte + message
overhead + the output limit) and the one it made before (ceil(characters / 4) per text + 8 per
message + the output limit) against the tokens and cost the provider reported:

- ratio = reserved / actual (tokens and cost), the smallest over the family's jobs: below 1,
  a job spent more than was reserved for it, so a budget's spent + reserved could pass its cap;
- overspend = the sum over jobs of what was spent beyond the reservation, in USD, and how many
  jobs did that.

Both rules are printed side by side from the same run (same inputs, same answers); the chars/4
rule is computed here only, for the comparison. The last table gives the CPU time of one
estimate under each rule.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from bench.common import Stack, print_table  # noqa: E402

SAMPLES = {
    "English": [
        "The quarterly planning meeting covered the hiring plan, the travel budget for next "
        "year and the office move. Everyone agreed to revisit the numbers in March.",
        "Customer reports that the export button stopped working after the last update; "
        "they need the monthly report for the board by Friday.",
    ],
    "code": [
        "def settle(job_id: int, cost: Decimal) -> None:\n    for budget in budgets_for(job_id):"
        "\n        Budget.objects.filter(pk=budget.pk).update(spent=F('spent') + cost)\n",
        "for (int i = 0; i < n; ++i) { total += prices[i] * qty[i]; if (total > cap) "
        "{ return -1; } }\n",
    ],
    "numbers": [
        "2024-03-17 18:45:09, 3.14159265, 299792458, 6.02214076e23, 1234567890, 42, 0.000183, "
        "987654321, 55.5, 1e-9",
        "Invoice 88317-4410: 12 x 19.99 = 239.88; VAT 19% = 45.58; total 285.46 (due 2025-01-31)",
    ],
    "CJK": [
        "季度计划会议讨论了招聘计划、明年的差旅预算以及办公室搬迁。大家同意在三月份重新审视这些数字。",
        "四半期の計画会議では、採用計画、来年の出張予算、オフィスの移転について話し合いました。",
    ],
    "emoji": [
        "🎉🚀👍🔥😀🙏✨💡📈🧪👨‍👩‍👧🏳️‍🌈🎯🧠💬",
        "Launch day! 🚀🚀🎉 Thanks team 🙏👏👏 next stop 📈🔥✨",
    ],
}


def chars4_tokens(workload, text: str) -> int:
    """The input estimate aiqueue used before (ceil(len / 4) per text, 8 per message)."""
    from jobs import kinds

    def estimate(part: str) -> int:
        return math.ceil(len(part) / 4) if part else 0

    system = kinds.system_prompt_for(workload)
    return estimate(system) + estimate(workload.render_prompt(text)) + 2 * 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs per family")
    parser.add_argument("--max-output", type=int, default=48)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    with Stack(sim_latency_ms=0, keep=args.keep) as stack:
        stack.django()
        from jobs import services
        from jobs.flow import budgets
        from jobs.models import Attempt, Job

        workload = stack.make_workload("Bench cost", max_output_tokens=args.max_output)
        price = workload.provider.price_for(workload.model)
        user = stack.user()
        jobs: dict[str, list[tuple[int, str]]] = {}
        for family, samples in SAMPLES.items():
            jobs[family] = []
            for n in range(args.jobs):
                text = f"{samples[n % len(samples)]} ({n})"
                job = services.do_submit_job(workload=workload, input_text=text, user=user)[0]
                jobs[family].append((job.pk, text))
        stack.start_workers(1, threads=8)
        pks = [pk for entries in jobs.values() for pk, _ in entries]
        stack.wait_until(
            lambda: Job.objects.filter(pk__in=pks, status="succeeded").count() == len(pks),
            timeout=300,
        )

        rows, cost_rows = [], []
        for family, entries in jobs.items():
            per_rule = {"chars/4": [], "UTF-8 bound": []}
            actual_cost = Decimal(0)
            for pk, text in entries:
                attempt = Attempt.objects.get(job_id=pk)
                actual_cost += attempt.cost
                out = workload.max_output_tokens
                reservations = {
                    "chars/4": (chars4_tokens(workload, text), out),
                    "UTF-8 bound": (budgets.estimate_input_tokens(workload, text), out),
                }
                for rule, (tokens_in, tokens_out) in reservations.items():
                    reserved_cost = price.cost(tokens_in, tokens_out)
                    per_rule[rule].append(
                        (
                            tokens_in,
                            tokens_in / max(1, attempt.tokens_in),
                            reserved_cost / attempt.cost,
                            max(Decimal(0), attempt.cost - reserved_cost),
                            reserved_cost,
                        )
                    )
            count = len(entries)
            old, new = per_rule["chars/4"], per_rule["UTF-8 bound"]
            ledger = list(Attempt.objects.filter(job_id__in=[pk for pk, _ in entries]))
            rows.append(
                (
                    family,
                    count,
                    round(sum(a.tokens_out for a in ledger) / count),
                    round(sum(a.tokens_in for a in ledger) / count),
                    round(sum(r[0] for r in old) / count),
                    f"{min(r[1] for r in old):.2f}",
                    round(sum(r[0] for r in new) / count),
                    f"{min(r[1] for r in new):.2f}",
                )
            )
            cost_rows.append(
                (
                    family,
                    f"{actual_cost:.6f}",
                    f"{sum(r[4] for r in old):.6f}",
                    f"{min(r[2] for r in old):.2f}",
                    f"{sum(r[3] for r in old):.6f} ({sum(r[3] > 0 for r in old)} jobs)",
                    f"{sum(r[4] for r in new):.6f}",
                    f"{min(r[2] for r in new):.2f}",
                    f"{sum(r[3] for r in new):.6f} ({sum(r[3] > 0 for r in new)} jobs)",
                )
            )
        print_table(
            [
                "family",
                "jobs",
                "actual output tok (mean)",
                "actual input tok (mean)",
                "chars/4 reserved (mean)",
                "chars/4 ratio (min)",
                "bound reserved (mean)",
                "bound ratio (min)",
            ],
            rows,
            title=f"Input tokens: reserved vs reported (max output {workload.max_output_tokens})",
        )
        print_table(
            [
                "family",
                "actual USD",
                "chars/4 reserved USD",
                "chars/4 ratio (min)",
                "chars/4 overspend USD",
                "bound reserved USD",
                "bound ratio (min)",
                "bound overspend USD",
            ],
            cost_rows,
            title="Cost per call (input + output): reserved vs billed, summed over the family",
        )

        texts = [text for entries in jobs.values() for _, text in entries]
        timings = []
        for rule, estimate in (
            ("chars/4", lambda text: chars4_tokens(workload, text)),
            ("UTF-8 bound", lambda text: budgets.estimate_input_tokens(workload, text)),
        ):
            started = time.process_time()
            for _ in range(20):
                for text in texts:
                    estimate(text)
            per_call = (time.process_time() - started) / (20 * len(texts)) * 1e6
            timings.append((rule, f"{per_call:.1f}"))
        print_table(["rule", "CPU µs per input estimate"], timings, title="Estimate cost")


if __name__ == "__main__":
    main()
