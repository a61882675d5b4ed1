"""Budgets: reserve-then-settle with the real database, Redis, worker code and simulator."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal

import pytest
from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from jobs import services
from jobs.flow import budgets
from jobs.models import Attempt, Budget, BudgetReservation, Job, Workload
from runs import reconcile
from tests.factories import INVOICE_SCHEMA, submit

pytestmark = pytest.mark.django_db

TEXT = "Quarterly meeting: hiring plan, budget review, office move."


def cap_for(workload, jobs: float, text=TEXT) -> Decimal:
    """A cap (4 decimal places, as the admin stores it) that fits `jobs` worst-case jobs."""
    nanos = budgets.estimate(workload, text).nanos * jobs
    return (Decimal(nanos) / Decimal(10**9)).quantize(Decimal("0.0001"), rounding=ROUND_DOWN)


def make_budget(workload=None, *, cap, on_exhausted="hold", period="month") -> Budget:
    return Budget.objects.create(
        name=f"budget-{Budget.objects.count()}",
        workload=workload,
        cap_usd=cap,
        on_exhausted=on_exhausted,
        period=period,
    )


def test_submit_reserves_the_worst_case_cost(redis_conn, workload, user):
    budget = make_budget(cap=Decimal("1"))
    job = submit(workload, user, TEXT)
    estimate = budgets.estimate(workload, TEXT)
    budget.refresh_from_db()
    job.refresh_from_db()
    assert estimate.tokens_out == workload.max_output_tokens
    assert budget.reserved_nanos == estimate.nanos
    assert job.cost_reserved == estimate.usd
    assert job.status == "queued"


def test_run_settles_actual_cost_and_releases_the_rest(redis_conn, workload, user, run_worker):
    global_budget = make_budget(cap=Decimal("1"))
    own_budget = make_budget(workload, cap=Decimal("1"))
    job = submit(workload, user, TEXT)
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"
    cost = Attempt.objects.get(job=job).cost
    for budget in (global_budget, own_budget):
        budget.refresh_from_db()
        assert budget.spent_usd == cost
        assert budget.reserved_nanos == 0
    assert job.cost_reserved == 0
    assert not BudgetReservation.objects.exists()


def test_submit_without_a_price_is_refused_when_a_budget_applies(redis_conn, provider, user):
    make_budget(cap=Decimal("10"))
    unpriced = Workload.objects.create(name="Unpriced", provider=provider, model="sim-unpriced")
    with pytest.raises(services.SubmitError, match="cannot estimate cost"):
        submit(unpriced, user, TEXT)
    assert not Job.objects.exists()


def test_rejecting_budget_refuses_the_submit_and_creates_nothing(redis_conn, workload, user):
    budget = make_budget(cap=cap_for(workload, 1.5), on_exhausted="reject")
    first = submit(workload, user, TEXT)
    with pytest.raises(services.Overloaded, match="is exhausted") as refused:
        submit(workload, user, TEXT)
    assert refused.value.retry_after > 0
    assert list(Job.objects.values_list("pk", flat=True)) == [first.pk]
    budget.refresh_from_db()
    assert budget.reserved_nanos == budgets.estimate(workload, TEXT).nanos


# Threads with connections of their own submit: their rows are committed.
@pytest.mark.django_db(transaction=True)
def test_200_concurrent_submissions_never_exceed_the_cap(redis_conn, workload, user, run_worker):
    budget = make_budget(cap=cap_for(workload, 50.5), on_exhausted="reject")
    barrier = threading.Barrier(20)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit_many(n: int) -> None:
        try:
            barrier.wait()
            for i in range(n):
                try:
                    submit(workload, user, TEXT)
                    outcome = "accepted"
                except services.Overloaded:
                    outcome = "refused"
                with lock:
                    outcomes.append(outcome + f"-{i}")
        finally:
            connection.close()  # each thread had its own connection

    threads = [threading.Thread(target=submit_many, args=(10,)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    accepted = sum(o.startswith("accepted") for o in outcomes)
    budget.refresh_from_db()
    assert len(outcomes) == 200
    assert accepted == 50
    assert Job.objects.count() == 50
    assert budget.spent_nanos + budget.reserved_nanos <= budget.cap_nanos
    assert budget.reserved_nanos == 50 * budgets.estimate(workload, TEXT).nanos

    run_worker()
    budget.refresh_from_db()
    spent = Attempt.objects.aggregate(total=Sum("cost"))["total"]
    assert set(Job.objects.values_list("status", flat=True)) == {"succeeded"}
    assert budget.reserved_nanos == 0
    assert budget.spent_usd == spent
    assert budget.spent_nanos <= budget.cap_nanos


def test_held_jobs_resume_in_priority_order_when_the_cap_is_raised(
    redis_conn, workload, user, run_worker, simulator, django_capture_on_commit_callbacks
):
    budget = make_budget(cap=cap_for(workload, 1.5))
    first = submit(workload, user, TEXT)
    low = submit(workload, user, TEXT, priority="low")
    high = submit(workload, user, TEXT, priority="high")
    for job in (low, high):
        job.refresh_from_db()
        assert job.status == "held"
        assert "exhausted" in job.wait_reason

    budget.cap_usd = cap_for(workload, 2.5)
    with django_capture_on_commit_callbacks(execute=True):
        budget.save()  # an operator raises the cap in the admin

    low.refresh_from_db()
    high.refresh_from_db()
    assert (high.status, low.status) == ("queued", "held")
    budget.refresh_from_db()
    assert budget.spent_nanos + budget.reserved_nanos <= budget.cap_nanos

    budget.cap_usd = cap_for(workload, 3.5)
    with django_capture_on_commit_callbacks(execute=True):
        budget.save()
    run_worker()
    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses == {first.pk: "succeeded", low.pk: "succeeded", high.pk: "succeeded"}
    assert "budget freed: released from hold" in list(low.events.values_list("reason", flat=True))
    assert simulator.counters()["requests_total"] == 3


def test_held_job_never_calls_the_provider_while_held(
    redis_conn, workload, user, run_worker, simulator
):
    make_budget(cap=Decimal("0"))
    job = submit(workload, user, TEXT)
    run_worker()
    job.refresh_from_db()
    assert job.status == "held"
    assert simulator.counters()["requests_total"] == 0


def test_new_period_resets_spend_and_releases_held_jobs(redis_conn, workload, user, run_worker):
    budget = make_budget(cap=cap_for(workload, 1.5), period="day")
    # Yesterday's spend used the whole cap.
    Budget.objects.filter(pk=budget.pk).update(
        spent_nanos=budget.cap_nanos, period_start=timezone.now() - timedelta(days=1, hours=1)
    )
    job = submit(workload, user, TEXT)
    job.refresh_from_db()
    assert job.status == "held"

    report = reconcile.run()

    budget.refresh_from_db()
    job.refresh_from_db()
    assert report.unheld == 1
    assert budget.spent_nanos == 0
    assert budget.period_start.date() == timezone.localtime().date()
    assert job.status == "queued"
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_reconciler_releases_a_reservation_left_by_a_dead_process(redis_conn, workload, user):
    budget = make_budget(cap=Decimal("1"))
    job = submit(workload, user, TEXT)
    # The job ended (say its worker died between finishing and releasing).
    Job.objects.filter(pk=job.pk).update(status=Job.Status.FAILED)

    report = reconcile.run()

    budget.refresh_from_db()
    assert report.reservations_released == 1
    assert budget.reserved_nanos == 0
    assert not BudgetReservation.objects.exists()


def test_cancelled_job_gives_its_reservation_back(redis_conn, workload, user, run_worker):
    budget = make_budget(cap=Decimal("1"))
    job = submit(workload, user, TEXT)
    services.do_cancel_job(job, actor=user)
    run_worker()
    budget.refresh_from_db()
    assert budget.reserved_nanos == 0
    assert budget.spent_nanos == 0


def test_idempotent_resubmit_returns_the_same_job_and_reserves_once(redis_conn, workload, user):
    budget = make_budget(cap=Decimal("1"))
    first, created = services.do_submit_job(
        workload=workload, input_text=TEXT, user=user, idempotency_key="order-7"
    )
    again, created_again = services.do_submit_job(
        workload=workload, input_text=TEXT, user=user, idempotency_key="order-7"
    )
    budget.refresh_from_db()
    assert (created, created_again) == (True, False)
    assert again.pk == first.pk
    assert budget.reserved_nanos == budgets.estimate(workload, TEXT).nanos


def test_admin_shows_spent_reserved_and_remaining(admin_client, redis_conn, workload, user):
    budget = make_budget(cap=Decimal("1"))
    submit(workload, user, TEXT)
    budget.refresh_from_db()
    page = admin_client.get("/admin/jobs/budget/").content.decode()
    assert f"{budget.reserved_usd:.6f}" in page
    assert f"{budget.remaining_usd:.6f}" in page
    assert '<td class="field-spent">0.000000</td>' in page  # not "0E-8"
    detail = admin_client.get(f"/admin/jobs/budget/{budget.pk}/change/").content.decode()
    assert "see the ledger" in detail
    blank = admin_client.get("/admin/jobs/budget/add/").content.decode()
    assert "0E-" not in blank
    assert "(alert)" not in blank  # a budget not yet saved uses nothing


def test_a_second_paid_call_is_reserved_first_or_the_job_is_held(
    redis_conn, provider, user, run_worker, django_capture_on_commit_callbacks
):
    """Extract's repair call comes after a paid call that used up part of the job's
    reservation. With a cap that fits one worst-case call, the repair cannot be reserved: the
    job is held instead of spending past the cap, and resumes when the cap is raised."""

    extractor = Workload.objects.create(
        name="Invoices",
        kind=Workload.Kind.EXTRACT,
        system_prompt="Extract the invoice fields.",
        output_schema=INVOICE_SCHEMA,
        provider=provider,
        model="sim-small",
        max_output_tokens=200,
    )
    text = "ACME invoice [[invalid-json]]"
    # The bound is far above what the first call costs: a cap of just over one bound fits the
    # first call, and no second (the repair resends the prompt, so its bound is larger).
    budget = make_budget(extractor, cap=cap_for(extractor, 1.05, text))
    job = submit(extractor, user, text)
    assert job.status == "queued"

    run_worker()

    job.refresh_from_db()
    budget.refresh_from_db()
    assert job.status == "held"
    assert "exhausted" in job.wait_reason
    assert job.attempts.count() == 1  # the repair call was never made
    assert budget.spent_nanos == budgets.usd_to_nanos(job.cost_actual)
    assert budget.spent_nanos + budget.reserved_nanos <= budget.cap_nanos
    assert budget.reserved_nanos == 0
    assert not BudgetReservation.objects.filter(job=job).exists()

    budget.cap_usd = cap_for(extractor, 4, text)
    with django_capture_on_commit_callbacks(execute=True):
        budget.save()  # on commit: held jobs that now fit are reserved for and resumed
    job.refresh_from_db()
    assert job.status == "queued"
    run_worker()
    job.refresh_from_db()
    budget.refresh_from_db()
    assert job.status == "needs_review"  # the simulator's JSON stays invalid: a human decides
    assert budget.spent_nanos == budgets.usd_to_nanos(job.cost_actual)
    assert budget.reserved_nanos == 0


def test_a_job_dearer_than_the_whole_cap_says_so_rejected_or_held(redis_conn, workload, user):
    worst = budgets.estimate(workload, TEXT).nanos  # 200 output tokens at $2/M: ~$0.0004
    budget = make_budget(cap=Decimal("0.0001"), on_exhausted="reject", period="day")
    assert worst > budget.cap_nanos
    dearer = f"one call of this job may cost up to {Decimal(worst) / 10**9:.6f} USD"
    whole = "budget 'budget-0' allows 0.000100 USD a day"

    # Rejecting: not "exhausted, renews next period" (a 429 to retry later): it never fits.
    with pytest.raises(services.SubmitError) as refused:
        submit(workload, user, TEXT)
    assert dearer in str(refused.value)
    assert whole in str(refused.value)
    assert not Job.objects.exists()

    # Holding: held (the operator may raise the cap), and its page says why it waits.
    Budget.objects.filter(pk=budget.pk).update(on_exhausted="hold")
    held = submit(workload, user, TEXT)
    assert held.status == "held"
    assert dearer in held.wait_reason
    assert whole in held.wait_reason


def test_exhausted_messages_show_what_a_call_costs_not_zero(redis_conn, workload, user):
    budget = make_budget(cap=cap_for(workload, 1.5), on_exhausted="hold")
    submit(workload, user, TEXT)
    held = submit(workload, user, TEXT)
    assert held.status == "held"
    budget.refresh_from_db()
    used = budget.reserved_usd
    assert 0 < used < Decimal("0.001")
    assert f"({used:.6f} of {budget.cap_usd:.6f} USD this month)" in held.wait_reason


def test_a_held_job_released_by_two_processes_at_once_is_reserved_once(
    redis_conn, workload, user, monkeypatch
):
    """Two processes run release_held for the same held job: each read the held list before
    the other reserved. The second must do nothing (it used to create a second reservation,
    hit unique_reservation_per_job, and the IntegrityError left admission.finish)."""
    budget = make_budget(cap=cap_for(workload, 1.5))
    first = submit(workload, user, TEXT)
    held = submit(workload, user, TEXT)
    assert held.status == "held"
    cap = cap_for(workload, 3.5)  # raised without the save signal: the test releases
    Budget.objects.filter(pk=budget.pk).update(cap_usd=cap, cap_nanos=budgets.usd_to_nanos(cap))

    real_estimate_for = budgets.estimate_for
    raced: list[int] = []

    def estimate_while_another_process_releases(job, **kwargs):
        # The other process gets in between this one's read of the held jobs and its reserve.
        if not raced:
            raced.append(-1)
            raced[0] = services.do_release_held()
        return real_estimate_for(job, **kwargs)

    monkeypatch.setattr(budgets, "estimate_for", estimate_while_another_process_releases)
    resumed_here = services.do_release_held()

    held.refresh_from_db()
    budget.refresh_from_db()
    assert raced == [1]  # the other process resumed it
    assert resumed_here == 0  # and this one did nothing
    assert held.status == "queued"
    assert BudgetReservation.objects.filter(job=held).count() == 1
    estimate = budgets.estimate(workload, TEXT).nanos
    assert budget.reserved_nanos == 2 * estimate  # first + held, once each
    assert first.pk != held.pk


def test_release_held_on_commit_never_raises_out_of_a_finished_run(
    redis_conn, workload, user, monkeypatch, run_worker
):
    """Whatever goes wrong in the on-commit release of held jobs, the run that gave its
    reservation back has finished: RQ must not record it as failed."""
    budget = make_budget(cap=cap_for(workload, 1.5))
    first = submit(workload, user, TEXT)
    submit(workload, user, TEXT)

    def broken(*args, **kwargs):
        raise RuntimeError("release_held broke")

    monkeypatch.setattr(services, "do_release_held", broken)
    run_worker()
    first.refresh_from_db()
    assert first.status == "succeeded"
    import django_rq
    from rq.registry import FailedJobRegistry

    assert FailedJobRegistry(queue=django_rq.get_queue("default")).count == 0
    assert budget.pk
