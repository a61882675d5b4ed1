from __future__ import annotations

import csv
import io

import pytest
from playwright.sync_api import expect

from batches import services
from batches.models import Batch
from jobs.models import Workload
from tests.browser.pages import answer_next_dialog, log_in

pytestmark = pytest.mark.browser


def review_sentiment(provider) -> Workload:
    return Workload.objects.create(
        name="Review sentiment",
        kind=Workload.Kind.CLASSIFY,
        provider=provider,
        model="sim-small",
        prompt_template="Product: {product}\nReview: {review}",
        labels=["positive", "neutral", "negative"],
        max_output_tokens=5,
    )


def test_staff_uploads_a_csv_batch_watches_it_fill_in_and_downloads_results(
    live_app, page, user, provider, tmp_path
):
    workload = review_sentiment(provider)
    path = tmp_path / "reviews.csv"
    rows = [["product", "review"]] + [[f"Item {i}", f"Review <b>{i}</b>"] for i in range(12)]
    rows.append(["Broken", ""])
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)

    log_in(page, live_app, "alice", "pw-alice-123")
    page.click("text=Batches")
    page.click("text=Upload a batch")
    page.select_option("#id_workload", label=workload.name)
    page.set_input_files("#id_file", str(path))
    page.click("button:has-text('Upload and preview')")

    # The preview and the bad row are shown before anything is queued.
    expect(page.locator("#preview")).to_contain_text("Review <b>0</b>")
    expect(page.locator("#bad-rows")).to_contain_text("empty value for 'review'")
    expect(page.locator("#valid-rows")).to_have_text("12")
    expect(page.locator("#estimated-cost")).to_contain_text("$0.")
    batch = Batch.objects.get()
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=4)  # several waves

    page.click("button:has-text('Start batch')")
    # The page follows the batch without a reload until every row has settled.
    expect(page.locator("#batch-status")).to_have_text("Completed", timeout=60_000)
    expect(page.locator("#count-done")).to_have_text("12")
    expect(page.locator("#count-remaining")).to_contain_text("0")

    with page.expect_download() as info:
        page.click("#download")
    body = open(info.value.path(), encoding="utf-8-sig").read()
    result = list(csv.DictReader(io.StringIO(body)))
    assert len(result) == 13
    assert [r["status"] for r in result].count("succeeded") == 12
    assert result[-1]["status"] == "invalid"
    assert all(r["output"] in {"positive", "neutral", "negative"} for r in result[:12])


def test_discarding_or_cancelling_a_batch_asks_first_and_every_row_is_accounted_for(
    live_app, page, user, provider, simulator
):
    simulator.control(latency_ms=20_000)  # the first wave is still running at the cancel
    workload = review_sentiment(provider)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(
        [["product", "review"]] + [[f"Item {i}", "Fine"] for i in range(8)]
    )

    def make_batch() -> Batch:
        return services.do_create_batch(
            workload=workload, filename="reviews.csv", data=buffer.getvalue().encode(), user=user
        )

    draft = make_batch()
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}{draft.get_absolute_url()}")
    declined = answer_next_dialog(page, accept=False)
    page.get_by_role("button", name="Discard").click()
    assert declined == [
        "Discard this batch? Its rows are not run, and the upload cannot be started again."
    ]
    expect(page.get_by_role("button", name="Start batch (8 rows)")).to_be_visible()
    answer_next_dialog(page, accept=True)
    page.get_by_role("button", name="Discard").click()
    expect(page.locator(".messages")).to_contain_text("Batch discarded.")

    running = make_batch()
    Batch.objects.filter(pk=running.pk).update(max_in_flight=2)
    running.refresh_from_db()
    services.do_start_batch(running)
    page.goto(f"{live_app.url}{running.get_absolute_url()}")
    declined = answer_next_dialog(page, accept=False)
    page.get_by_role("button", name="Cancel batch").click()
    assert declined == [
        "Cancel this batch? Rows not yet run will not run; jobs in flight are cancelled."
    ]
    expect(page.locator("#batch-status")).to_have_text("Running")
    answer_next_dialog(page, accept=True)
    page.get_by_role("button", name="Cancel batch").click()

    # The 2 jobs in flight and the 6 rows never queued: all 8 valid rows, none "failed".
    expect(page.locator("#batch-status")).to_have_text("Cancelled")
    expect(page.locator("#count-cancelled")).to_have_text("8")
    expect(page.locator("#count-failed")).to_have_text("0")
    expect(page.locator("#count-remaining")).to_contain_text("0 (0 in flight, 0 not yet queued)")
