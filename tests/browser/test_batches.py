from __future__ import annotations

import csv
import io

import pytest
from playwright.sync_api import expect

from batches.models import Batch
from jobs.models import Workload
from tests.browser.conftest import log_in

pytestmark = pytest.mark.browser


def test_staff_uploads_a_csv_batch_watches_it_fill_in_and_downloads_results(
    live_app, page, user, provider, tmp_path
):
    workload = Workload.objects.create(
        name="Review sentiment",
        kind=Workload.Kind.CLASSIFY,
        provider=provider,
        model="sim-small",
        prompt_template="Product: {product}\nReview: {review}",
        labels=["positive", "neutral", "negative"],
        max_output_tokens=5,
    )
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
