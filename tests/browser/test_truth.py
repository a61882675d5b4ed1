"""Pages that say what is true: what a live page ends on is what a reload shows."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import expect

from jobs import queueing, services
from jobs.flow import budgets
from jobs.models import Attempt, Budget, Job, Workload
from review import services as review_services
from review.models import ReviewItem
from tests.browser.pages import (
    TEXT,
    answer_next_dialog,
    log_in,
    open_live_page,
    submit_held_back,
    wait_for_status,
)
from tests.factories import make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LIVE_REGIONS = ("#job-summary", "#job-output-card", "#job-attempts")


def live_regions(page) -> dict[str, str]:
    """The live regions' text; the submit time is relative ("5 s ago") and moves by itself."""
    return {
        region: re.sub(r"Submitted\n.* ago", "Submitted", page.locator(region).inner_text())
        for region in LIVE_REGIONS
    }


def test_cancelled_running_job_ends_on_what_a_reload_shows(
    live_app, page, user, workload, simulator, monkeypatch
):
    workload.provider.max_concurrency = 1
    workload.provider.save()
    simulator.control(latency_ms=3000, stream_chunk_delay_ms=100)
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    open_live_page(page, f"{live_app.url}{job.get_absolute_url()}")
    queueing.enqueue(job)
    # Cancelled while the answer streams in.
    expect(page.locator("pre#job-output")).not_to_be_empty(timeout=30_000)
    answer_next_dialog(page, accept=True)
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status .badge")).to_have_text("Cancelled")
    wait_for_status(job, "cancelled")
    # The run settles its call after the cancel; the page hears of it once more.
    attempt = job.attempts.get()
    for _ in range(300):
        attempt.refresh_from_db()
        if attempt.state != Attempt.State.IN_FLIGHT:
            break
        page.wait_for_timeout(100)
    expect(page.locator("#job-cost")).to_have_text(f"${attempt.cost:.6f}")
    pushed = live_regions(page)
    page.reload()
    expect(page.locator("#job-status .badge")).to_have_text("Cancelled")
    assert pushed == live_regions(page)
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


def test_finished_job_under_a_budget_ends_without_its_reservation(
    live_app, page, user, workload, monkeypatch
):
    Budget.objects.create(name="Monthly", cap_usd=Decimal("5"))
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    open_live_page(page, f"{live_app.url}{job.get_absolute_url()}")
    expect(page.locator("#job-summary")).to_contain_text("Reserved")
    queueing.enqueue(job)
    expect(page.locator("#job-status .badge")).to_have_text("Succeeded", timeout=30_000)
    expect(page.locator("#job-summary")).not_to_contain_text("Reserved")
    pushed = live_regions(page)
    page.reload()
    assert pushed == live_regions(page)


def test_budget_admin_period_spent_and_ledger_agree(live_app, page, user, workload):
    # Spend from before the budget existed is not the budget's.
    before = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    wait_for_status(before, "succeeded")
    budget = Budget.objects.create(name="Daily", cap_usd=Decimal("5"), period="day")
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    wait_for_status(job, "succeeded")
    budget.refresh_from_db()
    since = Attempt.objects.filter(started_at__gte=budget.period_start)
    assert budget.spent_usd == sum(attempt.cost for attempt in since) > 0
    User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    log_in(page, live_app, "root", "pw-root-123")
    page.goto(f"{live_app.url}/admin/jobs/budget/{budget.pk}/change/")
    start = page.locator(".field-period_began .readonly")
    expect(start).to_have_text(budgets.local_time_text(budget.period_start))
    expect(page.locator(".field-spent .readonly")).to_have_text(f"{budget.spent_usd:.6f}")
    expect(page.locator(".field-ledger .readonly")).to_contain_text(
        f"1 attempt(s), {budget.spent_usd:.6f} USD"
    )


def test_new_job_form_after_back_shows_the_chosen_workloads_fields(live_app, page, user, workload):
    Workload.objects.create(
        name="A documents",
        kind=Workload.Kind.DOCUMENT,
        system_prompt="Summarize the document.",
        provider=workload.provider,
        model="sim-small",
    )
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}/jobs/new/")
    expect(page.locator("#id_document")).to_be_visible()
    page.select_option("#id_workload", label=workload.name)
    page.fill("#id_input_text", TEXT)
    page.click("button:has-text('Submit job')")
    first = Job.objects.get()
    page.wait_for_url(f"{live_app.url}{first.get_absolute_url()}")

    page.go_back()
    expect(page.locator("#id_workload")).to_have_value(str(workload.pk))
    expect(page.locator("#id_input_text")).to_be_visible()
    expect(page.locator("#id_document")).to_have_count(0)
    page.fill("#id_input_text", TEXT)
    page.click("button:has-text('Submit job')")
    expect(page.locator(".message.success")).to_contain_text("Job submitted")
    assert Job.objects.count() == 2


def test_batch_waiting_only_for_review_says_so_not_an_eta_of_zero(
    live_app, page, user, classify_workload, tmp_path
):
    workload = classify_workload
    path = tmp_path / "messages.csv"
    path.write_text("input\nWin a prize now\nLunch at noon?\nOffer [[low-confidence]]\n")
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}/batches/new/")
    page.select_option("#id_workload", label=workload.name)
    page.set_input_files("#id_file", str(path))
    page.click("button:has-text('Upload and preview')")
    page.click("button:has-text('Start batch')")
    expect(page.locator("#count-review")).to_have_text("1", timeout=60_000)
    expect(page.locator("#count-done")).to_have_text("2")
    expect(page.locator("#batch-status")).to_have_text("Running")
    expect(page.locator("#batch-waits")).to_contain_text("waiting for review: 1 row(s)")
    expect(page.locator("#batch-eta")).to_have_text("when the reviewers have resolved 1 row(s)")


def test_review_item_retried_to_success_shows_the_new_output(live_app, page, workload):
    reviewer = make_user("rita", role="reviewer")
    job = services.do_submit_job(workload=workload, input_text="Tell me [[refuse]]", user=reviewer)[
        0
    ]
    wait_for_status(job, "needs_review")
    item = ReviewItem.objects.get(job=job)
    review_services.do_retry(item, reviewer, overrides={"prompt": TEXT})
    wait_for_status(job, "succeeded")
    log_in(page, live_app, "rita", "pw-rita-123")
    page.goto(f"{live_app.url}{item.get_absolute_url()}")
    expect(page.locator("#review-retry-outcome")).to_contain_text("the job is now succeeded")
    job.refresh_from_db()
    expect(page.locator("#review-retry-output")).to_have_text(job.output_text)
    expect(page.locator("#review-output")).to_have_text(
        "The model produced no output before the retry."
    )


def test_a_waiting_job_says_why_once_and_lists_count_seconds(live_app, page, user, workload):
    Workload.objects.filter(pk=workload.pk).update(is_paused=True)
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    wait_for_status(job, "waiting")
    job.refresh_from_db()
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}{job.get_absolute_url()}")
    summary = page.locator("#job-summary").inner_text()
    assert summary.count(job.wait_reason) == 1, summary
    assert summary.count("resumes") == 1, summary
    assert "next check" not in summary
    page.goto(f"{live_app.url}/jobs/")
    expect(page.locator(f"#job-row-{job.code}")).to_contain_text(" s ago")
    expect(page.locator("table.jobs")).not_to_contain_text("0 minutes ago")


def test_new_jobs_on_the_list_raise_no_htmx_errors(live_app, page, user, workload):
    errors: list[str] = []
    log_in(page, live_app, "alice", "pw-alice-123")
    open_live_page(page, f"{live_app.url}/jobs/")
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.evaluate(
        "window.oobErrors = 0;"
        "document.body.addEventListener('htmx:oobErrorNoTarget', () => window.oobErrors++)"
    )
    jobs = [
        services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0] for _ in range(3)
    ]
    for job in jobs:
        expect(page.locator(f"#job-row-{job.code} .badge")).to_have_text(
            "Succeeded", timeout=30_000
        )
    assert page.evaluate("window.oobErrors") == 0
    assert errors == []


def test_disabled_approve_looks_disabled_and_the_site_has_a_favicon(live_app, page, workload):
    reviewer = make_user("rita", role="reviewer")
    job = services.do_submit_job(workload=workload, input_text="Tell me [[refuse]]", user=reviewer)[
        0
    ]
    wait_for_status(job, "needs_review")
    item = ReviewItem.objects.get(job=job)
    log_in(page, live_app, "rita", "pw-rita-123")
    page.goto(f"{live_app.url}{item.get_absolute_url()}")
    approve = page.get_by_role("button", name="Approve as is (a)")
    expect(approve).to_be_disabled()
    style = "b => [getComputedStyle(b).cursor, getComputedStyle(b).backgroundColor]"
    enabled = page.locator("#edit-panel button.primary, button.primary:not([disabled])").first
    assert approve.evaluate(style)[0] == "not-allowed"
    assert approve.evaluate(style)[1] != enabled.evaluate(style)[1]
    icon = page.request.get(f"{live_app.url}/favicon.ico")
    assert icon.status == 200
    assert icon.headers["content-type"] in {"image/x-icon", "image/vnd.microsoft.icon"}


def test_the_nav_stays_on_one_line_at_390_px(live_app, browser, db):
    User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    context = browser.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    try:
        log_in(page, live_app, "root", "pw-root-123")
        tops = page.locator(".topbar nav a").evaluate_all(
            "links => links.map(link => link.getBoundingClientRect().top)"
        )
        assert len(tops) == 8  # Dashboard, Jobs, New job, Batches, Workers, Spend, Review, Admin
        assert len(set(tops)) == 1, tops
        brand = page.locator(".topbar .brand").bounding_box()
        logout = page.locator(".topbar .logout").bounding_box()
        assert abs(brand["y"] + brand["height"] / 2 - logout["y"] - logout["height"] / 2) < 8
        assert page.evaluate("document.documentElement.scrollWidth") == 390
    finally:
        context.close()


# One sample of what the dashboard shows: the tiles, the counters and the workload rows.
SAMPLE_DASHBOARD = """() => {
  const number = el => el ? parseInt(el.textContent.trim(), 10) : null;
  const tiles = {};
  for (const name of ["queued", "waiting", "held", "running"]) {
    tiles[name] = number(document.querySelector(`#health-${name} .value`));
  }
  const counters = {};
  document.querySelectorAll("#status-counts .counter").forEach(counter => {
    counters[counter.className.split("status-")[1]] = number(counter.querySelector(".count"));
  });
  const rows = {queued: 0, waiting: 0, held: 0, running: 0};
  document.querySelectorAll("#workload-health tbody tr[id^=workload-]").forEach(row => {
    const cells = row.querySelectorAll("td.num");
    rows.queued += cells[0].textContent.split("/").reduce((a, n) => a + parseInt(n, 10), 0);
    rows.waiting += number(cells[1]);
    rows.held += number(cells[2]);
    rows.running += number(cells[3]);
  });
  return {tiles, counters, rows, countersOutside: document.querySelectorAll("#job-counters").length,
          asOf: document.querySelector("#dashboard-live .notice:last-of-type").textContent};
}"""


def test_dashboard_under_a_burst_shows_one_set_of_figures_that_agree(
    live_app, page, operator, workload, provider, simulator
):
    simulator.control(latency_ms=400)
    other = Workload.objects.create(
        name="Tags", kind=Workload.Kind.SUMMARIZE, provider=provider, model="sim-small",
        concurrency_cap=2, max_output_tokens=50,
    )  # fmt: skip
    log_in(page, live_app, "olga", "pw-olga-123")
    open_live_page(page, f"{live_app.url}/")
    burst = 24
    for index in range(burst):
        services.do_submit_job(
            workload=workload if index % 2 else other, input_text=TEXT, user=operator
        )
    samples = []
    for _ in range(240):
        samples.append(page.evaluate(SAMPLE_DASHBOARD))
        page.wait_for_timeout(250)
        if samples[-1]["counters"].get("succeeded") == burst:
            break
    totals = []
    for sample in samples:
        # Each figure once: no second set of counters beside the panel's.
        assert sample["countersOutside"] == 0
        # The tiles and the workload rows count the same jobs at the same instant.
        assert sample["tiles"] == sample["rows"], sample
        totals.append(sum(sample["tiles"].values()) + sum(sample["counters"].values()))
    # Every job is in exactly one status of a snapshot: no job is lost between two figures.
    assert totals == sorted(totals)
    assert totals[-1] == burst
    assert samples[-1]["counters"]["succeeded"] == burst
    # The figures moved during the burst, not only at the end.
    assert len({sample["asOf"] for sample in samples}) > 2
