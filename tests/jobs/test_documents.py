"""Document jobs: type by content, extraction from real pdf/docx files, chunking, map/reduce."""

from __future__ import annotations

import io
from datetime import timedelta
from decimal import Decimal

import docx
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from jobs import documents, kinds, live, services
from jobs.documents import DocumentError, extract, split_into_chunks
from jobs.flow import budgets
from jobs.models import Budget, Job, Workload, nanos_to_usd
from review import services as review_services
from review.models import ReviewItem
from runs import mapreduce, reconcile
from runs.worker import build_worker

pytestmark = pytest.mark.django_db


def make_pdf(lines: list[str]) -> bytes:
    """A minimal one-page PDF with real text operators, written by hand (xref offsets too)."""
    text_ops = " ".join(
        f"BT /F1 12 Tf 72 {720 - 16 * i} Td ({line}) Tj ET" for i, line in enumerate(lines)
    )
    stream = text_ops.encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


def make_docx(paragraphs: list[str]) -> bytes:
    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "Amount"
    table.rows[0].cells[1].text = "EUR 1,200"
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def test_text_is_extracted_from_a_real_pdf():
    document = extract("contract.pdf", make_pdf(["Supplier delivers 200 units.", "Due in March."]))
    assert document.file_type == "pdf"
    assert "Supplier delivers 200 units." in document.text
    assert "Due in March." in document.text


def test_text_is_extracted_from_a_real_docx_including_tables():
    document = extract("contract.docx", make_docx(["First clause.", "Second clause."]))
    assert document.file_type == "docx"
    assert "First clause.\n\nSecond clause." in document.text
    assert "Amount | EUR 1,200" in document.text


def test_type_is_checked_by_content_not_by_name():
    with pytest.raises(DocumentError, match="named like a PDF file but its content is plain"):
        extract("report.pdf", b"just some text")
    with pytest.raises(DocumentError, match="not a supported document"):
        extract("notes.txt", b"MZ\x90\x00\x03\x00\x00\x00 an executable")
    # A PDF with a misleading name is still read as the PDF it is... unless the name claims
    # another known type.
    with pytest.raises(DocumentError, match="content is PDF"):
        extract("notes.docx", make_pdf(["x"]))
    assert extract("scan", make_pdf(["Hello"])).file_type == "pdf"
    assert extract("readme.md", b"# Title\n\nBody").file_type == "md"


def test_size_limit_is_enforced_with_a_clear_error(settings):
    settings.AIQUEUE_DOCUMENT_MAX_BYTES = 1000
    upload = SimpleUploadedFile("big.txt", b"a" * 2000)
    with pytest.raises(DocumentError, match="the limit is 0.0 MB|larger than"):
        documents.read_upload(upload)


def test_damaged_and_empty_files_are_refused():
    with pytest.raises(DocumentError, match="empty"):
        extract("a.txt", b"")
    with pytest.raises(DocumentError, match="damaged Word file|not a supported"):
        extract("a.docx", b"PK\x03\x04not really a zip")
    with pytest.raises(DocumentError, match="not UTF-8"):
        extract("a.txt", b"caf\xe9")


def test_chunks_respect_the_size_and_cut_at_paragraphs():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 40 for i in range(10))
    chunks = split_into_chunks(text, 500)
    assert all(len(chunk) <= 500 for chunk in chunks)
    assert len(chunks) > 1
    assert all(chunk.startswith("Paragraph") for chunk in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(
        " ", ""
    )
    assert split_into_chunks("x" * 1200, 500) == ["x" * 500, "x" * 500, "x" * 200]


@pytest.fixture
def digest(provider) -> Workload:
    return Workload.objects.create(
        name="Digest",
        kind=Workload.Kind.DOCUMENT,
        provider=provider,
        model="sim-small",
        prompt_template="Summarize this part:\n{input}",
        chunk_chars=300,
        max_output_tokens=200,
    )


def submit_document(workload, user, paragraphs) -> Job:
    document = extract("doc.docx", make_docx(paragraphs))
    job, _ = services.do_submit_document(workload=workload, document=document, user=user)
    return job


def document_with_a_failed_chunk(digest, user, run_worker, simulator, clause: str):
    """A four-chunk document whose first chunk's only allowed call fails for good (it goes to
    review) while the others succeed; returns (document, chunks in order, the failed chunk)."""
    paragraphs = [f"Clause {i}: {clause} " * 3 for i in range(4)]
    digest.max_attempts = 1
    digest.save()
    simulator.control(script=[400])
    job = submit_document(digest, user, paragraphs)
    run_worker()
    job.refresh_from_db()
    chunks = list(job.children.order_by("chunk_index"))
    [failed] = [c for c in chunks if c.status != "succeeded"]
    return job, chunks, failed


def test_document_is_mapped_per_chunk_and_reduced_with_cost_summed(
    redis_conn, digest, user, user_client, run_worker, simulator
):
    paragraphs = [f"Clause {i}: the supplier delivers goods on time. " * 3 for i in range(6)]
    job = submit_document(digest, user, paragraphs)

    run_worker()

    job.refresh_from_db()
    chunks = list(job.children.order_by("chunk_index"))
    assert len(chunks) >= 3
    assert all(chunk.status == "succeeded" for chunk in chunks)
    assert job.status == "succeeded"
    assert job.output_text
    assert job.progress_percent == 100
    # One call per chunk plus the reduce call; the reduce prompt holds every chunk's answer.
    assert simulator.counters()["requests_total"] == len(chunks) + 1
    total = sum(c.cost_actual for c in chunks) + job.cost_actual
    assert job.total_cost == total
    assert job.cost_actual > 0
    assert job.input_data["file_type"] == "docx"
    page = user_client.get(job.get_absolute_url()).content.decode()
    assert 'id="job-chunks"' in page
    assert f"${job.total_cost:.6f}" in page  # the document's cost with its chunks
    assert "{#" not in page  # no template comment leaks onto the page
    body = user_client.get(f"/api/jobs/{job.code}").json()  # the API says the same
    assert Decimal(body["cost_usd"]) == job.cost_actual
    assert Decimal(body["cost_with_chunks_usd"]) == total
    # One upload, one row: the lists show the document; its page lists the chunks.
    listed = user_client.get("/jobs/").context["page"].object_list
    assert [j.pk for j in listed] == [job.pk]
    dashboard = user_client.get("/").context
    assert [j.pk for j in dashboard["recent"]] == [job.pk]
    assert dict((status, n) for status, _label, n in dashboard["counts"])["succeeded"] == 1
    for chunk in chunks:
        assert str(chunk.code)[:8] in page
    # The document page's live update carries the chunks' table, so it follows them.
    update = live.render_job_update(job)["html"]
    table = update[update.index('<section class="card" id="job-chunks" hx-swap-oob="true">') :]
    table = table[: table.index("</section>")]
    assert table.count('data-status="succeeded"') == len(chunks)
    # A chunk's live updates go to its own page only: no list row, no counters to move.
    assert live.render_list_updates(chunks[0], created=True) == []
    assert live.list_groups(chunks[0]) == []


def test_failed_chunk_is_retried_alone(redis_conn, digest, user, run_worker, simulator):
    job, chunks, failed = document_with_a_failed_chunk(
        digest, user, run_worker, simulator, "the buyer pays within thirty days."
    )
    assert failed.status == "needs_review"
    assert job.status == "waiting"  # the document waits while its chunk is with a reviewer
    calls_before = simulator.counters()["requests_total"]

    # The reviewer retries the chunk: only that chunk runs again, then the reduce call.
    item = ReviewItem.objects.get(job=failed)
    review_services.do_claim(item, user)
    review_services.do_retry(item, user)
    run_worker()

    job.refresh_from_db()
    assert job.status == "succeeded"
    assert simulator.counters()["requests_total"] == calls_before + 2
    succeeded_once = [c for c in chunks if c.pk != failed.pk]
    assert all(c.attempts.count() == 1 for c in succeeded_once)


def test_document_upload_form_creates_a_document_job(redis_conn, digest, user_client):
    upload = SimpleUploadedFile("terms.pdf", make_pdf(["Payment within 30 days."]))
    response = user_client.post(
        "/jobs/new/", {"workload": digest.pk, "document": upload, "idempotency_key": "k1"}
    )
    job = Job.objects.get()
    assert response.status_code == 302
    assert "Payment within 30 days." in job.input_text
    assert job.input_data["filename"] == "terms.pdf"


def test_document_upload_form_keeps_the_start_time_and_deadline(redis_conn, digest, user_client):
    start = timezone.localtime() + timedelta(hours=2)
    deadline = start + timedelta(hours=1)
    upload = SimpleUploadedFile("terms.pdf", make_pdf(["Delivery by sea."]))
    user_client.post(
        "/jobs/new/",
        {
            "workload": digest.pk,
            "document": upload,
            "idempotency_key": "k2",
            "start_at": start.strftime("%Y-%m-%dT%H:%M"),
            "deadline": deadline.strftime("%Y-%m-%dT%H:%M"),
        },
    )
    job = Job.objects.get()
    assert job.status == "scheduled"  # not queued at once, as the form asked
    assert job.scheduled_for == start.replace(second=0, microsecond=0)
    assert job.deadline == deadline.replace(second=0, microsecond=0)


def test_document_upload_form_shows_why_a_file_is_refused(redis_conn, digest, user_client):
    upload = SimpleUploadedFile("terms.pdf", b"plain text pretending")
    response = user_client.post("/jobs/new/", {"workload": digest.pk, "document": upload})
    assert response.status_code == 400
    assert "its content is plain text" in response.content.decode()
    assert Job.objects.count() == 0


def test_rejected_chunk_sends_the_document_to_review_and_its_retry_reruns_only_that_chunk(
    redis_conn, digest, user, run_worker, simulator, admin_client
):
    job, chunks, failed = document_with_a_failed_chunk(
        digest, user, run_worker, simulator, "the seller insures the cargo."
    )
    chunk_count = len(chunks)

    # The reviewer sees which document the chunk belongs to.
    chunk_item = ReviewItem.objects.get(job=failed)
    page = admin_client.get(chunk_item.get_absolute_url()).content.decode()
    assert f"chunk {failed.chunk_index + 1} of" in page
    assert job.get_absolute_url() in page

    # A reviewer rejects the chunk: the document cannot be whole, so it goes to review itself,
    # naming the chunk, instead of waiting forever or reducing without it.
    review_services.do_claim(chunk_item, user)
    review_services.do_reject(chunk_item, user, reason="garbled scan")
    run_worker()
    job.refresh_from_db()
    assert job.status == "needs_review"
    assert (
        f"1 of {chunk_count} chunks did not succeed (chunk {failed.chunk_index + 1})" in job.error
    )
    assert job.error_class == "chunk_failed"
    calls_before = simulator.counters()["requests_total"]

    # Retrying the document re-queues exactly the rejected chunk, then reduces.
    document_item = ReviewItem.objects.get(job=job, status=ReviewItem.Status.OPEN)
    review_services.do_claim(document_item, user)
    review_services.do_retry(document_item, user)
    run_worker()

    job.refresh_from_db()
    failed.refresh_from_db()
    assert job.status == "succeeded"
    assert failed.status == "succeeded"
    assert simulator.counters()["requests_total"] == calls_before + 2  # the chunk, the reduce
    others = job.children.exclude(pk=failed.pk)
    assert all(chunk.attempts.count() == 1 for chunk in others)


def test_a_chunk_corrected_in_review_lets_the_document_finish_at_once(
    redis_conn, digest, user, run_worker, simulator
):
    job, _chunks, failed = document_with_a_failed_chunk(
        digest, user, run_worker, simulator, "the buyer inspects the goods."
    )

    # The reviewer writes the chunk's summary by hand: the document reduces now, not at its
    # next periodic check (CHECK_INTERVAL_S).
    item = ReviewItem.objects.get(job=failed)
    review_services.do_claim(item, user)
    review_services.do_correct(item, user, corrected_output="The buyer inspects the goods.")
    run_worker()

    job.refresh_from_db()
    assert job.status == "succeeded"
    assert "Part 1:\nThe buyer inspects the goods." in kinds.combined_chunk_outputs(job)


# The worker runs one job at a time here, not through run_worker: rows must be committed.
@pytest.mark.django_db(transaction=True)
def test_cancelling_a_document_cancels_its_chunks_before_they_call(
    redis_conn, digest, user, simulator
):
    paragraphs = [f"Clause {i}: the carrier is liable for loss. " * 3 for i in range(6)]
    job = submit_document(digest, user, paragraphs)
    # The split, no chunk yet.
    build_worker(name="split-only", inline=True).work(burst=True, max_jobs=1)
    job.refresh_from_db()
    assert job.status == "waiting"
    chunks = job.children.count()
    assert chunks >= 3

    assert services.do_cancel_job(job, actor=user, reason="wrong file")
    build_worker(name="after-cancel", inline=True).work(burst=True)

    assert simulator.counters()["requests_total"] == 0  # no chunk made its call
    statuses = set(job.children.values_list("status", flat=True))
    assert statuses == {"cancelled"}
    event = job.children.first().events.order_by("-created_at", "-id").first()
    assert event.reason == "its document was cancelled"


def test_cancelling_a_document_withdraws_its_chunk_from_the_review_inbox(
    redis_conn, digest, user, run_worker, simulator, django_capture_on_commit_callbacks
):
    job, _chunks, failed = document_with_a_failed_chunk(
        digest, user, run_worker, simulator, "the seller insures the cargo."
    )
    assert (job.status, failed.status) == ("waiting", "needs_review")
    item = ReviewItem.objects.get(job=failed)
    review_services.do_claim(item, user)  # a reviewer has it open

    # The inbox hears of the stop once it is committed (jobs.signals.job_stopped).
    with django_capture_on_commit_callbacks(execute=True):
        assert services.do_cancel_job(job, actor=user, reason="wrong file")

    failed.refresh_from_db()
    item.refresh_from_db()
    assert failed.status == "cancelled"
    assert (item.status, item.resolution) == ("resolved", "withdrawn")
    assert item.resolved_by == user
    assert item.note == "its document was cancelled"
    assert not review_services.open_items().filter(job__parent=job).exists()
    calls = simulator.counters()["requests_total"]
    with pytest.raises(review_services.ReviewError, match="already resolved"):
        review_services.do_retry(item, user)  # the reviewer's click lands after: no paid call
    run_worker()
    assert simulator.counters()["requests_total"] == calls


def test_rejecting_a_document_withdraws_its_chunk_still_in_review(
    redis_conn, digest, user, run_worker, simulator, django_capture_on_commit_callbacks
):
    paragraphs = [f"Clause {i}: the buyer pays the freight. " * 3 for i in range(4)]
    digest.max_attempts = 1
    digest.save()
    simulator.control(script=[400, 400])  # two chunks' only calls fail: both go to review
    job = submit_document(digest, user, paragraphs)
    run_worker()
    first, second = ReviewItem.objects.filter(job__parent=job).order_by("job__chunk_index")

    review_services.do_claim(first, user)
    review_services.do_reject(first, user, reason="unreadable scan")
    run_worker()  # the document wakes, sees a failed chunk and goes to review itself
    job.refresh_from_db()
    assert job.status == "needs_review"
    document_item = ReviewItem.objects.get(job=job)
    review_services.do_claim(document_item, user)
    with django_capture_on_commit_callbacks(execute=True):  # the stop's news, on commit
        review_services.do_reject(document_item, user, reason="not worth fixing")

    second.refresh_from_db()
    assert (second.status, second.resolution) == ("resolved", "withdrawn")
    assert second.job.status == "cancelled"
    assert second.note == "its document was rejected in review"
    assert not review_services.open_items().exists()


# The worker runs one job at a time here, not through run_worker: rows must be committed.
@pytest.mark.django_db(transaction=True)
def test_a_document_past_its_deadline_expires_with_its_chunks(redis_conn, digest, user, simulator):
    paragraphs = [f"Clause {i}: the port fees are the buyer's. " * 3 for i in range(6)]
    document = extract("doc.docx", make_docx(paragraphs))
    deadline = timezone.now() + timedelta(hours=1)
    job, _ = services.do_submit_document(
        workload=digest, document=document, user=user, deadline=deadline
    )
    build_worker(name="split-only", inline=True).work(burst=True, max_jobs=1)
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))

    reconcile.run()
    build_worker(name="after-expiry", inline=True).work(burst=True)

    job.refresh_from_db()
    assert job.status == "expired"
    assert simulator.counters()["requests_total"] == 0
    assert set(job.children.values_list("status", flat=True)) == {"cancelled"}


def test_a_document_that_fits_its_budget_is_not_held_by_its_own_reservation(
    redis_conn, digest, user, run_worker, simulator
):
    # Long chunks, short answers (the usual shape): the reduce call reads 6 short answers.
    digest.chunk_chars, digest.max_output_tokens = 2000, 50
    digest.save()
    paragraphs = [f"Clause {i}: the carrier is liable for loss in transit. " * 36 for i in range(6)]
    text = extract("doc.docx", make_docx(paragraphs)).text
    chunks = split_into_chunks(text, digest.chunk_chars)
    assert len(chunks) == 6
    chunk_calls = sum(budgets.estimate(digest, chunk).nanos for chunk in chunks)
    reduce_call = budgets.estimate(digest, "", min_tokens_in=6 * 60 + 60).nanos
    cap = chunk_calls + reduce_call
    # Reserved as if the whole text were the reduce call's input, it would not fit beside
    # its chunks: they were held with the document waiting for them, until the next period.
    assert budgets.estimate(digest, text).nanos + chunk_calls > cap
    Budget.objects.create(name="Digests", workload=digest, cap_usd=nanos_to_usd(cap))

    job = submit_document(digest, user, paragraphs)
    for _ in range(3):
        run_worker()
        reconcile.run()

    job.refresh_from_db()
    assert job.children.count() == 6
    assert job.status == "succeeded"
    budget = Budget.objects.get(name="Digests")
    assert budget.spent_nanos <= budget.cap_nanos
    assert budget.reserved_nanos == 0


def test_a_reduce_call_longer_than_its_reservation_is_held_not_overspent(
    redis_conn, digest, user, run_worker, simulator
):
    Budget.objects.create(name="Digests", workload=digest, cap_usd=10)
    job, _chunks, failed = document_with_a_failed_chunk(
        digest, user, run_worker, simulator, "the buyer pays the port fees."
    )
    # Leave the budget just what is reserved: then a reviewer writes a chunk's answer far
    # longer than a model's, so the reduce prompt outgrows the document's reservation.
    budget = Budget.objects.get(name="Digests")
    Budget.objects.filter(pk=budget.pk).update(
        cap_usd=nanos_to_usd(budget.spent_nanos + budget.reserved_nanos),
        cap_nanos=budget.spent_nanos + budget.reserved_nanos,
    )
    item = ReviewItem.objects.get(job=failed)
    review_services.do_claim(item, user)
    review_services.do_correct(item, user, corrected_output="The buyer pays. " * 300)
    run_worker()

    job.refresh_from_db()
    budget.refresh_from_db()
    assert job.status == "held"  # not called: the call could have passed the cap
    assert budget.spent_nanos + budget.reserved_nanos <= budget.cap_nanos
    assert job.attempts.count() == 0

    Budget.objects.filter(pk=budget.pk).update(cap_usd=10, cap_nanos=10 * 10**9)
    services.do_release_held()
    run_worker()
    job.refresh_from_db()
    assert job.status == "succeeded"  # nothing lost: it runs once the budget allows
    [reduce_call] = job.attempts.all()
    assert reduce_call.tokens_in > 1200  # it did read the long correction


def test_a_one_chunk_document_is_its_chunks_answer_without_a_reduce_call(
    redis_conn, digest, user, run_worker, simulator
):
    job = submit_document(digest, user, ["Clause 1: delivery within ten days."])
    run_worker()

    job.refresh_from_db()
    [chunk] = job.children.all()
    assert job.status == "succeeded"
    assert job.output_text == chunk.final_output
    assert simulator.counters()["requests_total"] == 1  # the chunk's call; no reduce call
    assert job.cost_actual == 0
    assert job.total_cost == chunk.cost_actual


def test_a_document_waiting_for_its_chunks_says_so(redis_conn, digest, user, user_client):
    job = submit_document(digest, user, [f"Clause {i}: the buyer pays." * 8 for i in range(3)])
    token = services.do_start_run(job)
    assert not mapreduce.ready_to_reduce(job, token)  # its first run fans the chunks out
    job.refresh_from_db()
    assert job.status == "waiting"
    total = job.children.count()
    page = user_client.get(job.get_absolute_url()).content.decode()
    stage = page.split('id="job-stage">', 1)[1].split("</dd>", 1)[0]
    assert stage.startswith('<span class="stage stage-waiting">Waiting for its chunks</span>')
    assert f"{total} of {total} chunks still to finish" in stage
    assert "capacity" not in stage
