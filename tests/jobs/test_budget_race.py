"""The budget cap is a ceiling: 200 concurrent submissions of inputs that cost several times
ceil(chars / 4) (Chinese, Japanese, emoji, code), against a budget for about 50 of them, with a
real threaded worker running them meanwhile and the simulator counting tokens as a byte-level
BPE tokenizer does.

What must hold at every instant sampled and at the end: spent + reserved <= cap; the ledger
equals the budget's spent and what the provider billed; every job that did not run is held (or
refused) with a message that names the budget; and RQ recorded no run as failed (two
processes releasing one held job used to raise IntegrityError out of finished runs)."""

from __future__ import annotations

import threading
import time
from decimal import ROUND_DOWN, Decimal

import django_rq
import pytest
from django.db import connection
from rq.registry import FailedJobRegistry

from jobs import services
from jobs.flow import budgets
from jobs.models import Attempt, Budget, Job, ModelPrice, Workload
from tests.helpers import start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CHINESE = (
    "季度计划会议讨论了招聘计划、明年的差旅预算以及办公室搬迁，大家同意在三月份重新审视这些数字。"
)
JAPANESE = "四半期の計画会議では、採用計画、来年の出張予算、オフィスの移転について話し合いました。"
EMOJI = "🎉🚀👍🔥😀🙏✨💡📈🧪👨‍👩‍👧🏳️‍🌈"
CODE = (
    "def settle(job_id: int, cost: Decimal) -> None:\n"
    "    for budget in budgets_for(job_id):\n"
    "        Budget.objects.filter(pk=budget.pk).update(spent=F('spent') + cost)\n"
)
FAMILIES = {"chinese": CHINESE * 3, "japanese": JAPANESE * 3, "emoji": EMOJI * 4, "code": CODE * 2}
SUBMITTERS = 20
EACH = 10


def inputs() -> list[str]:
    texts = []
    for n in range(SUBMITTERS * EACH):
        family = list(FAMILIES)[n % len(FAMILIES)]
        texts.append(f"{n} {FAMILIES[family]}")
    return texts


@pytest.mark.parametrize("on_exhausted", ["hold", "reject"])
def test_200_concurrent_submissions_of_costly_scripts_stay_under_the_cap(
    on_exhausted, redis_conn, provider, user, simulator, tmp_path
):
    workload = Workload.objects.create(
        name="Notes", kind=Workload.Kind.SUMMARIZE, provider=provider, model="sim-small",
        max_output_tokens=32,
    )  # fmt: skip
    texts = inputs()
    mean = sum(budgets.estimate(workload, text).nanos for text in texts) / len(texts)
    cap = (Decimal(mean * 50) / 10**9).quantize(Decimal("0.0001"), rounding=ROUND_DOWN)
    budget = Budget.objects.create(name="Team CJK", cap_usd=cap, on_exhausted=on_exhausted)

    samples: list[tuple[int, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        try:
            while not sampling.is_set():
                samples.append(
                    Budget.objects.values_list("spent_nanos", "reserved_nanos").get(pk=budget.pk)
                )
                time.sleep(0.005)
        finally:
            connection.close()

    refusals: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(SUBMITTERS)

    def submit(batch: list[str]) -> None:
        try:
            barrier.wait()
            for text in batch:
                try:
                    services.do_submit_job(workload=workload, input_text=text, user=user)
                except services.SubmitError as exc:
                    with lock:
                        refusals.append(str(exc))
        finally:
            connection.close()

    worker = start_worker(tmp_path, threads=8)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        threads = [
            threading.Thread(target=submit, args=(texts[i::SUBMITTERS],)) for i in range(SUBMITTERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        active = [Job.Status.QUEUED, Job.Status.RUNNING, Job.Status.WAITING]
        wait_for(lambda: not Job.objects.filter(status__in=active).exists(), timeout=180)
        time.sleep(1)  # a release in flight as the last job ended
        wait_for(lambda: not Job.objects.filter(status__in=active).exists(), timeout=60)
    finally:
        sampling.set()
        sampler.join(timeout=5)
        stop(worker)

    budget.refresh_from_db()
    assert len(samples) > 20
    over = [(s, r) for s, r in samples if s + r > budget.cap_nanos]
    assert not over, f"spent + reserved above the cap in {len(over)} of {len(samples)} samples"
    assert budget.spent_nanos + budget.reserved_nanos <= budget.cap_nanos

    # The ledger is the budget's spent, and what the provider billed, which stays under the cap.
    attempts = list(Attempt.objects.all())
    assert sum(budgets.usd_to_nanos(a.cost) for a in attempts) == budget.spent_nanos
    price = ModelPrice.objects.get(provider=provider, model="sim-small")
    counters = simulator.counters()
    billed = price.cost(counters["prompt_tokens"], counters["completion_tokens"])
    assert billed == sum(a.cost for a in attempts)
    assert billed <= budget.cap_usd

    ran = Job.objects.filter(status=Job.Status.SUCCEEDED).count()
    assert ran >= 45  # about 50 fit their worst case; each settles at less
    statuses = set(Job.objects.values_list("status", flat=True))
    if on_exhausted == "hold":
        assert statuses == {"succeeded", "held"}
        for reason in Job.objects.filter(status="held").values_list("wait_reason", flat=True):
            assert "budget 'Team CJK'" in reason
        assert Job.objects.count() == len(texts)
    else:
        assert statuses == {"succeeded"}
        assert refusals
        assert all("Budget 'Team CJK'" in message for message in refusals)
        assert Job.objects.count() + len(refusals) == len(texts)
    # No run that finished was recorded as failed by RQ.
    for name in ("high", "default", "low"):
        assert FailedJobRegistry(queue=django_rq.get_queue(name)).count == 0
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert "IntegrityError" not in logs
    assert "Traceback" not in logs
