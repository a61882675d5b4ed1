"""Batches end to end: upload, map, preview, waves of admission, pause/resume/cancel, results."""

from __future__ import annotations

import csv
import io
from collections import Counter
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile

from batches import services
from batches.models import Batch, BatchRow
from jobs.models import Budget, Job, Workload
from review import services as review_services
from review.models import ReviewItem
from tests.helpers import queued_ids

pytestmark = pytest.mark.django_db


@pytest.fixture
def sentiment(provider) -> Workload:
    return Workload.objects.create(
        name="Sentiment",
        kind=Workload.Kind.CLASSIFY,
        provider=provider,
        model="sim-small",
        prompt_template="Product: {product}\nReview: {review}",
        labels=["positive", "neutral", "negative"],
        max_output_tokens=5,
    )


def csv_bytes(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


def make_batch(workload, user, rows, **kwargs) -> Batch:
    return services.do_create_batch(
        workload=workload, filename="reviews.csv", data=csv_bytes(rows), user=user, **kwargs
    )


REVIEWS = [
    ["product", "review"],
    ["Kettle", "Boils fast.\nQuiet too."],
    ["Toaster", ""],
    ["Lamp", "Too dim, returned it"],
]


def test_upload_shows_preview_and_row_errors_before_anything_is_queued(
    redis_conn, sentiment, user_client
):
    upload = SimpleUploadedFile("reviews.csv", csv_bytes(REVIEWS), content_type="text/csv")
    response = user_client.post(
        "/batches/new/", {"workload": sentiment.pk, "file": upload, "priority": "low"}
    )
    batch = Batch.objects.get()
    assert response.status_code == 302
    assert response["Location"] == batch.get_absolute_url()

    page = user_client.get(batch.get_absolute_url()).content.decode()
    assert "Boils fast." in page  # the preview shows the mapped input
    assert "empty value for &#x27;review&#x27;" in page  # row 2, reported
    assert batch.status == "draft"
    assert (batch.total_rows, batch.invalid_rows) == (3, 1)
    assert batch.estimated_cost > 0
    assert Job.objects.count() == 0
    assert queued_ids() == []


def test_missing_column_blocks_the_start_until_it_is_mapped(redis_conn, sentiment, user):
    batch = make_batch(sentiment, user, [["product", "comment"], ["Kettle", "Great"]])
    assert services.mapping_problems(batch) == ["Input field 'review' has no column: choose one."]
    with pytest.raises(services.BatchError, match="'review' has no column"):
        services.do_start_batch(batch)

    services.do_set_mapping(batch, {"product": "product", "review": "comment"})
    batch.refresh_from_db()
    assert services.mapping_problems(batch) == []
    assert batch.invalid_rows == 0
    assert BatchRow.objects.get().input_data == {"product": "Kettle", "review": "Great"}


def test_batch_is_admitted_in_waves_and_completes(
    redis_conn, sentiment, user, run_worker, django_capture_on_commit_callbacks
):
    rows = [["product", "review"]] + [[f"Item {i}", f"Review number {i}"] for i in range(10)]
    batch = make_batch(sentiment, user, rows)
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=4)
    batch.refresh_from_db()

    with django_capture_on_commit_callbacks(execute=True):
        assert services.do_start_batch(batch) == 4
    assert len(queued_ids()) == 4  # not 10: the rest wait as pending rows
    assert BatchRow.objects.filter(batch=batch, job__isnull=True).count() == 6

    run_worker()  # each settled job refills the wave once it is half empty

    batch.refresh_from_db()
    assert batch.status == "completed"
    assert Job.objects.filter(batch=batch, status="succeeded").count() == 10
    progress = services.progress(batch)
    assert (progress.done, progress.remaining) == (10, 0)
    assert progress.spent > 0


def test_bad_rows_are_skipped_and_good_rows_run(redis_conn, sentiment, user, run_worker):
    batch = make_batch(sentiment, user, REVIEWS)
    services.do_start_batch(batch)
    run_worker()
    batch.refresh_from_db()
    assert batch.status == "completed"
    assert Job.objects.filter(batch=batch).count() == 2
    assert BatchRow.objects.get(number=2).job is None


def test_pause_stops_admission_and_resume_continues(redis_conn, sentiment, user, run_worker):
    rows = [["product", "review"]] + [[f"Item {i}", "Fine"] for i in range(6)]
    batch = make_batch(sentiment, user, rows)
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=2)
    batch.refresh_from_db()
    services.do_start_batch(batch)
    assert services.do_pause_batch(batch)

    run_worker()  # the wave in flight finishes; nothing new is admitted
    assert Job.objects.filter(batch=batch).count() == 2
    assert services.admit_running() == 0

    assert services.do_resume_batch(batch)
    run_worker()
    batch.refresh_from_db()
    assert batch.status == "completed"
    assert Job.objects.filter(batch=batch, status="succeeded").count() == 6


def test_cancel_cancels_jobs_in_flight_and_pending_rows_never_run(
    redis_conn, sentiment, user, run_worker, simulator
):
    rows = [["product", "review"]] + [[f"Item {i}", "Fine"] for i in range(5)]
    batch = make_batch(sentiment, user, rows)
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=2)
    batch.refresh_from_db()
    services.do_start_batch(batch)

    assert services.do_cancel_batch(batch, actor=user) == 2
    run_worker()
    assert simulator.counters()["requests_total"] == 0
    assert set(Job.objects.filter(batch=batch).values_list("status", flat=True)) == {"cancelled"}
    assert services.progress(batch).remaining == 0


def test_a_batch_cancelled_mid_way_accounts_for_every_valid_row_as_its_csv_does(
    redis_conn, sentiment, user, user_client, run_worker, simulator
):
    Workload.objects.filter(pk=sentiment.pk).update(confidence_threshold=0.5)
    rows = [
        ["product", "review"],
        ["Kettle", "Fine"],
        ["Lamp", "Awful [[refuse]]"],
        ["Mug", "Unsure [[low-confidence]]"],
        ["Toaster", ""],  # invalid
    ] + [[f"Item {i}", "Fine"] for i in range(6)]
    batch = make_batch(sentiment, user, rows)
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=4)
    batch.refresh_from_db()
    url = batch.get_absolute_url()

    # The first wave settles while the batch is paused (the refusal is rejected in review);
    # the second is queued when the batch is cancelled, and the last row was never queued.
    services.do_start_batch(batch)
    services.do_pause_batch(batch)
    run_worker()
    refused = ReviewItem.objects.get(job__batch=batch, job__input_data__product="Lamp")
    review_services.do_claim(refused, user)
    review_services.do_reject(refused, user, reason="refused")
    services.do_resume_batch(batch)
    user_client.post(f"/batches/{batch.code}/cancel/")
    run_worker()
    batch.refresh_from_db()
    assert batch.status == "cancelled"

    progress = services.progress(batch)
    counts = {
        "succeeded": progress.done,
        "needs_review": progress.in_review,
        "failed": progress.failed,
        "cancelled": progress.cancelled,
    }
    assert counts == {"succeeded": 2, "needs_review": 1, "failed": 1, "cancelled": 5}
    assert progress.remaining == 0
    assert sum(counts.values()) == progress.valid == batch.valid_rows == 9
    assert progress.percent == 100

    statuses = Counter(row["status"] for row in download(user_client, batch))
    assert statuses == {**counts, "invalid": 1}

    page = user_client.get(url).content.decode()
    assert '<dd id="count-failed">1</dd>' in page
    assert '<dd id="count-cancelled">5</dd>' in page
    assert '<dd id="count-remaining">0 ' in page


def test_results_csv_has_inputs_outputs_and_status_partial_or_complete(
    redis_conn, sentiment, user, user_client, run_worker
):
    rows = REVIEWS + [['=HYPERLINK("x")', "formula in the input"]]
    batch = make_batch(sentiment, user, rows)
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=2)
    services.do_start_batch(Batch.objects.get(pk=batch.pk))

    partial = download(user_client, batch)
    assert [r["status"] for r in partial] == ["queued", "invalid", "queued", "pending"]

    run_worker()
    result = download(user_client, batch)
    assert [r["status"] for r in result] == ["succeeded", "invalid", "succeeded", "succeeded"]
    first = result[0]
    assert first["review"] == "Boils fast.\nQuiet too."
    assert first["output"] in {"positive", "neutral", "negative"}
    assert float(first["confidence"]) > 0
    assert float(first["cost_usd"]) > 0
    assert result[1]["error"].startswith("empty value")
    assert result[3]["product"] == '\'=HYPERLINK("x")'  # neutralised for spreadsheets


def download(client, batch) -> list[dict]:
    response = client.get(f"/batches/{batch.code}/results.csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    body = b"".join(response.streaming_content).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(body)))


def test_ten_thousand_rows_are_stored_and_only_one_wave_is_queued(
    redis_conn, sentiment, user, django_capture_on_commit_callbacks
):
    rows = [["product", "review"]] + [[f"Item {i}", f"Review {i}"] for i in range(10_000)]
    rows[5000][1] = ""  # one bad row among them
    batch = make_batch(sentiment, user, rows)
    assert (batch.total_rows, batch.invalid_rows) == (10_000, 1)

    with django_capture_on_commit_callbacks(execute=True):
        admitted = services.do_start_batch(batch)

    assert admitted == batch.max_in_flight == 100
    assert len(queued_ids()) == 100
    assert BatchRow.objects.filter(batch=batch, job__isnull=True, error="").count() == 9_899


def test_other_users_cannot_see_or_change_a_batch(redis_conn, sentiment, user, other_user, client):
    batch = make_batch(sentiment, user, REVIEWS)
    client.force_login(other_user)
    assert client.get(batch.get_absolute_url()).status_code == 404
    assert client.post(f"/batches/{batch.code}/start/").status_code == 404
    assert client.get(f"/batches/{batch.code}/results.csv").status_code == 404


def test_document_workloads_cannot_take_batches(redis_conn, provider, user):
    workload = Workload.objects.create(
        name="Docs", kind=Workload.Kind.DOCUMENT, provider=provider, model="sim-small"
    )
    with pytest.raises(services.BatchError):
        make_batch(workload, user, REVIEWS)


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_the_batch_page_controls_map_start_pause_resume_and_cancel(
    redis_conn, sentiment, user, user_client, django_capture_on_commit_callbacks
):
    rows = [["product", "comment"]] + [[f"Item {i}", "Fine"] for i in range(6)]
    batch = make_batch(sentiment, user, rows)
    Batch.objects.filter(pk=batch.pk).update(max_in_flight=2)
    url = batch.get_absolute_url()

    def post(action: str, data: dict | None = None):
        with django_capture_on_commit_callbacks(execute=True):  # the request's commit
            response = user_client.post(f"/batches/{batch.code}/{action}/", data or {}, follow=True)
        assert response.redirect_chain == [(url, 302)]
        batch.refresh_from_db()
        return response

    # Starting before the missing column is mapped is refused with the reason; nothing queued.
    response = post("start")
    assert any("'review' has no column" in m for m in messages_of(response))
    assert batch.status == "draft"
    assert queued_ids() == []

    post("mapping", {"field_product": "product", "field_review": "comment"})
    assert BatchRow.objects.filter(batch=batch).first().input_data["review"] == "Fine"

    response = post("start")
    assert "Batch started: the first 2 row(s) are queued." in messages_of(response)
    assert len(queued_ids()) == 2

    response = post("pause")
    assert batch.status == "paused"
    assert any(m.startswith("Batch paused") for m in messages_of(response))
    response = post("resume")
    assert batch.status == "running"
    assert "Batch resumed." in messages_of(response)

    response = post("cancel")
    assert batch.status == "cancelled"
    assert "Batch cancelled (2 job(s) in flight cancelled)." in messages_of(response)
    assert set(Job.objects.filter(batch=batch).values_list("status", flat=True)) == {"cancelled"}
    response = post("cancel")  # a second click says so and changes nothing
    assert "The batch is cancelled." in messages_of(response)


def test_only_the_owner_or_a_job_operator_may_change_a_batch(
    redis_conn, sentiment, user, other_user, client
):
    batch = make_batch(sentiment, user, REVIEWS)
    # Seeing every job is not enough to change someone else's batch.
    other_user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(other_user)
    assert client.get(batch.get_absolute_url()).status_code == 200
    assert client.post(f"/batches/{batch.code}/start/").status_code == 403
    batch.refresh_from_db()
    assert batch.status == "draft"


def test_a_row_resolved_in_review_completes_the_batch_at_once(
    redis_conn, sentiment, user, run_worker, django_capture_on_commit_callbacks
):
    Workload.objects.filter(pk=sentiment.pk).update(confidence_threshold=0.5)
    rows = [["product", "review"], ["Kettle", "Fine"], ["Lamp", "Unsure [[low-confidence]]"]]
    batch = make_batch(sentiment, user, rows)
    services.do_start_batch(batch)
    run_worker()
    batch.refresh_from_db()
    assert batch.status == "running"  # a row is still with a reviewer

    item = ReviewItem.objects.get(job__batch=batch)
    with django_capture_on_commit_callbacks(execute=True):
        review_services.do_claim(item, user)
        review_services.do_approve(item, user)

    # Not at the reconciler's next pass: the approval itself settles the batch.
    batch.refresh_from_db()
    assert batch.status == "completed"
    assert services.progress(batch).done == 2


def test_the_batch_list_is_paginated_newest_first(
    redis_conn, sentiment, user, user_client, settings
):
    settings.AIQUEUE_JOBS_PER_PAGE = 2
    made = [make_batch(sentiment, user, REVIEWS) for _ in range(3)]
    first = user_client.get("/batches/")
    assert [b.pk for b in first.context["page"].object_list] == [made[2].pk, made[1].pk]
    assert "Page 1 of 2 · 3 batches" in first.content.decode()
    second = user_client.get("/batches/", {"page": 2})
    assert [b.pk for b in second.context["page"].object_list] == [made[0].pk]


def test_a_refused_wave_keeps_its_rows_pending_says_why_and_goes_on_when_allowed(
    redis_conn, sentiment, user, user_client, run_worker
):
    budget = Budget.objects.create(name="Pilot", cap_usd=Decimal("0"), on_exhausted="reject")
    batch = make_batch(sentiment, user, [["product", "review"], ["Kettle", "Fine"]])

    assert services.do_start_batch(batch) == 0  # nothing admitted, nothing lost
    batch.refresh_from_db()
    assert batch.status == "running"
    assert "budget 'Pilot'" in batch.admission_error
    assert BatchRow.objects.get(batch=batch).job is None
    assert "budget &#x27;Pilot&#x27;" in user_client.get(batch.get_absolute_url()).content.decode()

    # Once the operator raises the budget, the next pass admits the row and clears the reason.
    budget.cap_usd = Decimal("5")
    budget.save()
    assert services.admit_running() == 1
    run_worker()
    batch.refresh_from_db()
    assert batch.admission_error == ""
    assert batch.status == "completed"


def upload(client, workload, name: str, data: bytes):
    file = SimpleUploadedFile(name, data, content_type="text/csv")
    return client.post("/batches/new/", {"workload": workload.pk, "file": file, "priority": "low"})


def test_a_file_whose_columns_do_not_match_says_why_each_row_is_invalid_and_costs_nothing(
    redis_conn, sentiment, user_client
):
    data = csv_bytes([["name", "comment"], ["Kettle", "Great"], ["Lamp", "Dim"]])
    upload(user_client, sentiment, "wrongcols.csv", data)
    batch = Batch.objects.get()
    assert (batch.valid_rows, batch.estimated_cost) == (0, 0)

    page = user_client.get(batch.get_absolute_url()).content.decode()
    reason = "no column for input field &#x27;product&#x27;, &#x27;review&#x27;"
    assert page.count(f'<td class="error">{reason}</td>') == 2  # each row of the preview
    assert "Nothing to estimate: no row is valid." in page
    assert "$0.0" not in page
    # The results CSV gives the same reason.
    assert [r["error"] for r in download(user_client, batch)] == [
        "no column for input field 'product', 'review'"
    ] * 2

    services.do_set_mapping(batch, {"product": "name", "review": "comment"})
    batch.refresh_from_db()
    assert batch.valid_rows == 2
    assert batch.estimated_cost > 0
    assert list(BatchRow.objects.values_list("error", flat=True)) == ["", ""]


def test_invalid_rows_show_what_they_hold_escaped(redis_conn, sentiment, user_client):
    rows = [["product", "review"], ["Kettle", "Fine"], ["Toaster", ""], ["<img src=x>", ""]]
    upload(user_client, sentiment, "reviews.csv", csv_bytes(rows))
    batch = Batch.objects.get()

    page = user_client.get(batch.get_absolute_url()).content.decode()
    preview = page[page.index('id="preview"') : page.index("</table>")]
    assert '<tr class="invalid">\n      <td class="num">2</td>\n      <td>Toaster</td>' in preview
    assert "<td>&lt;img src=x&gt;</td>" in preview
    bad_rows = page[page.index('id="bad-rows"') :]
    assert "<code>product</code> Toaster" in bad_rows
    assert "<img src=x>" not in page


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("photo.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR,\x00\x01", "holds NUL bytes"),
        ("rows.jsonl", '{"text": "hi"}\n'.encode("utf-16-le"), "holds NUL bytes"),
        ("reviews.csv", b"product,review\n", "has a header but no data rows"),
        ("reviews.csv", b"product,review\n,\n\n", "has a header but no data rows"),
    ],
)
def test_a_file_without_data_rows_is_refused_at_upload_and_nothing_is_stored(
    redis_conn, sentiment, user_client, name, data, message
):
    response = upload(user_client, sentiment, name, data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert Batch.objects.count() == 0
    assert BatchRow.objects.count() == 0


def test_destructive_batch_buttons_ask_first_and_a_discarded_draft_says_so(
    redis_conn, sentiment, user, user_client
):
    draft = make_batch(sentiment, user, REVIEWS)
    page = user_client.get(draft.get_absolute_url()).content.decode()
    assert (
        f'<form method="post" action="/batches/{draft.code}/cancel/" class="inline" '
        'data-confirm="Discard this batch?' in page
    )

    response = user_client.post(f"/batches/{draft.code}/cancel/", follow=True)
    assert messages_of(response) == ["Batch discarded."]
    draft.refresh_from_db()
    assert draft.status == "cancelled"

    running = make_batch(sentiment, user, REVIEWS)
    services.do_start_batch(running)
    page = user_client.get(running.get_absolute_url()).content.decode()
    assert (
        f'<form method="post" action="/batches/{running.code}/cancel/" class="inline" '
        'data-confirm="Cancel this batch? Rows not yet run will not run; jobs in flight are '
        'cancelled.">' in page
    )
