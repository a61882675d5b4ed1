"""Property-based fuzzing of every entry point that takes input from outside (issue 18).

For the API, the job form, the batch and document uploads, the review forms (bulk included),
login, and the batch and document parsers: whatever is sent, the answer is never a 500, and a
refused request changes no row. Each example runs in a savepoint that is rolled back, so the
rows it adds do not pile up. `AIQUEUE_FUZZ_EXAMPLES` (default 40) sets the examples per test;
a failure prints the example and a `@reproduce_failure` blob.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from urllib.parse import quote_from_bytes

import pytest
from django.contrib.auth.models import Group, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batches import parsing
from batches.models import Batch, BatchRow
from jobs import documents, inputs
from jobs.models import ApiToken, Attempt, Job, JobEvent, ModelPrice, Provider, Workload
from review.models import ReviewItem

FUZZ = settings(
    max_examples=int(os.environ.get("AIQUEUE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- what hostile input looks like ------------------------------------------------------------

NASTY = [
    "\ud800",
    "\udfff",
    "a\x00b",
    '=HYPERLINK("http://evil.example")',
    "-inf",
    "+nan",
    "@SUM(A1)",
    "<script>alert(1)</script>",
    "{input}",
    "{{ request }}",
    "\u202e\u0645",
    "9" * 30,
    "-1",
    "",
    " ",
    "x" * 300,
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-12:00",
    "2026-02-30T10:00:00Z",
    "high",
    "low",
]
# Text as JSON can carry it: lone surrogates included (what a "\ud800" escape decodes to).
surrogate_text = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=5),
    st.characters(categories=["Cs"]),
    st.text(max_size=5),
)
any_text = st.one_of(
    st.sampled_from(NASTY),
    surrogate_text,
    st.text(alphabet=st.characters(exclude_categories=()), max_size=40),
)
# Text a browser can send in a form (it cannot encode a lone surrogate).
form_text = st.one_of(
    st.sampled_from([t for t in NASTY if not inputs.SURROGATE_RE.search(t)]),
    st.text(max_size=40),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)
    ),
    max_leaves=8,
)


# Random bytes, and random bytes behind a PDF's or a .docx (zip) file's magic number.
document_bytes = st.one_of(
    st.binary(max_size=400),
    st.binary(max_size=200).map(lambda b: b"%PDF-1.4\n" + b),
    st.binary(max_size=200).map(lambda b: b"PK\x03\x04" + b),
)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- the world ---------------------------------------------------------------------------------


@pytest.fixture
def world(db, redis_conn):
    provider = Provider.objects.create(name="Sim", kind=Provider.Kind.SIMULATED)
    ModelPrice.objects.create(provider=provider, model="m", input_per_mtok=Decimal(1))
    single = Workload.objects.create(
        name="Notes", kind=Workload.Kind.SUMMARIZE, provider=provider, model="m"
    )
    fields = Workload.objects.create(
        name="Reply",
        kind=Workload.Kind.GENERATE,
        provider=provider,
        model="m",
        prompt_template="To {customer} about {topic}",
    )
    document = Workload.objects.create(
        name="Docs", kind=Workload.Kind.DOCUMENT, provider=provider, model="m"
    )
    user = User.objects.create_user("fuzz", password="pw-fuzz-123")
    reviewer = User.objects.create_user("rev", password="pw-rev-123")
    reviewer.groups.add(Group.objects.get(name="Reviewers"))
    token = ApiToken(user=user, name="fuzz")
    key = token.set_new_key()
    token.save()
    job = Job.objects.create(
        workload=single, submitted_by=user, input_text="x", status=Job.Status.NEEDS_REVIEW
    )
    item = ReviewItem.objects.create(job=job, reason=ReviewItem.Reason.FAILED)
    return {
        "single": single, "fields": fields, "document": document, "user": user,
        "reviewer": reviewer, "key": key, "item": item,
    }  # fmt: skip


def snapshot() -> tuple:
    """The rows a refused request must leave as they were."""
    return (
        Job.objects.count(),
        JobEvent.objects.count(),
        Attempt.objects.count(),
        Batch.objects.count(),
        BatchRow.objects.count(),
        tuple(ReviewItem.objects.order_by("pk").values_list("status", "claimed_by_id")),
        tuple(Job.objects.order_by("pk").values_list("status", "priority")),
    )


def check(send) -> None:
    """Send one request inside a rolled-back savepoint: no 500, and nothing changed unless
    it was accepted."""
    with transaction.atomic():
        before = snapshot()
        response = send()
        after = snapshot()
        transaction.set_rollback(True)
    assert response.status_code < 500, response.content[:300]
    if response.status_code >= 400:
        assert after == before, response.status_code


def logged_in(user: User) -> Client:
    client = Client(raise_request_exception=True)
    client.force_login(user)
    return client


# --- the API -----------------------------------------------------------------------------------


hostile = st.one_of(any_text, json_values)


@st.composite
def mutated(draw, valid: dict, hostile_values: dict) -> dict:
    """A valid body with some of its fields swapped for hostile values, some dropped and some
    added: each hostile value then reaches the code behind the checks it passes."""
    body = dict(valid)
    for name in draw(st.lists(st.sampled_from(sorted(hostile_values)), unique=True, max_size=3)):
        body[name] = draw(hostile_values[name])
    for name in draw(st.lists(st.sampled_from(sorted(valid)), unique=True, max_size=1)):
        body.pop(name, None)
    return body


def api_bodies(world: dict) -> st.SearchStrategy:
    workload = st.sampled_from(["Notes", "Reply", "Docs", world["single"].pk, world["fields"].pk])
    times = st.one_of(st.sampled_from(NASTY[-5:]), hostile)
    return st.one_of(
        mutated(
            {"workload": "Notes", "input": "hello"},
            {
                "workload": st.one_of(workload, hostile),
                "input": hostile,
                "priority": hostile,
                "deadline": times,
                "start_at": times,
                "idempotency_key": hostile,
            },  # fmt: skip
        ),
        mutated(
            {"workload": "Reply", "fields": {"customer": "Ann", "topic": "tea"}},
            {
                "fields": st.one_of(
                    st.fixed_dictionaries({"customer": any_text, "topic": any_text}), hostile
                ),
                "workload": st.one_of(workload, hostile),
            },  # fmt: skip
        ),
    )


@FUZZ
@given(data=st.data())
def test_the_api_never_answers_500_and_a_refusal_changes_nothing(world, data):
    body = data.draw(api_bodies(world))
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes
    client = Client(raise_request_exception=True)
    auth = {"Authorization": f"Bearer {world['key']}"}

    check(lambda: post_api(client, raw, auth))


def post_api(client: Client, raw: bytes, headers: dict):
    response = client.post("/api/jobs", data=raw, content_type="application/json", headers=headers)
    assert response["Content-Type"] == "application/json"
    return response


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.integers(min_value=30, max_value=5000).map(deep),
        st.integers(min_value=30, max_value=5000).map(lambda n: '{"input": ' + deep(n) + "}"),
        json_values.map(json.dumps),
    ),
    header_key=st.one_of(st.none(), st.text(max_size=300)),
)
def test_any_body_and_idempotency_header_is_answered_in_json(world, raw, header_key):
    client = Client(raise_request_exception=True)
    headers = {"Authorization": f"Bearer {world['key']}"}
    if header_key is not None and header_key.isprintable() and header_key.isascii():
        headers["Idempotency-Key"] = header_key

    check(lambda: post_api(client, raw if isinstance(raw, bytes) else raw.encode(), headers))


# --- the forms ---------------------------------------------------------------------------------


def urlencoded(fields: dict[str, bytes | str]) -> bytes:
    """A form body as a client could send it, invalid UTF-8 included."""
    parts = []
    for name, value in fields.items():
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        parts.append(f"{name}={quote_from_bytes(raw)}")
    return "&".join(parts).encode()


form_values = st.one_of(form_text, st.binary(max_size=30), numbers.map(str))


@FUZZ
@given(
    data=st.dictionaries(
        st.sampled_from(
            [
                "workload",
                "input_text",
                "priority",
                "start_at",
                "deadline",
                "idempotency_key",
                "field_customer",
                "field_topic",
            ]  # fmt: skip
        ),
        form_values,
    ),
    workload=st.sampled_from(["single", "fields", "document", None]),
)
def test_the_job_form_never_answers_500(world, data, workload):
    if workload is not None:
        data["workload"] = str(world[workload].pk)
    client = logged_in(world["user"])
    check(
        lambda: client.post(
            "/jobs/new/", data=urlencoded(data), content_type="application/x-www-form-urlencoded"
        )
    )


cells = st.one_of(form_text, st.sampled_from(NASTY))
csv_files = st.lists(st.lists(cells, min_size=1, max_size=4), min_size=1, max_size=5).map(
    lambda rows: "\n".join(",".join(json.dumps(c) for c in row) for row in rows)
)
jsonl_lines = st.one_of(
    st.dictionaries(st.one_of(st.just("input"), any_text), json_values, max_size=3),
    st.fixed_dictionaries({"input": any_text}),
    json_values,
).map(json.dumps)
jsonl_files = st.lists(
    st.one_of(jsonl_lines, st.sampled_from(['{"input": ' + deep(100) + "}"])),
    min_size=1,
    max_size=5,
).map("\n".join)
file_bytes = st.one_of(
    csv_files.map(lambda t: t.encode("utf-8", "surrogatepass")),
    jsonl_files.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)
uploads = st.one_of(
    st.tuples(st.just("rows.csv"), csv_files.map(lambda t: t.encode("utf-8", "surrogatepass"))),
    st.tuples(st.sampled_from(["rows.jsonl", "rows.ndjson"]), jsonl_files.map(str.encode)),
    st.tuples(st.sampled_from(["rows.csv", "rows.jsonl", "rows.txt", ""]), file_bytes),
)


@FUZZ
@given(
    upload_file=uploads,
    priority=st.one_of(st.just("low"), form_text),
    workload=st.sampled_from(["single", "single", "fields", "document", "missing"]),
)
def test_a_batch_upload_never_answers_500_and_every_page_of_it_renders(
    world, upload_file, priority, workload
):
    name, content = upload_file
    client = logged_in(world["user"])
    pk = world[workload].pk if workload != "missing" else 10**30
    upload = SimpleUploadedFile(name or "x", content, content_type="text/csv")

    def send():
        response = client.post("/batches/new/", {"workload": pk, "file": upload,
                                                 "priority": priority})  # fmt: skip
        if response.status_code == 302:  # accepted: its page and its results must render
            page = client.get(response["Location"])
            assert page.status_code == 200
            results = client.get(response["Location"] + "results.csv")
            body = b"".join(results.streaming_content).decode("utf-8-sig")
            assert body.count("\n") >= 1
        return response

    check(send)


@FUZZ
@given(
    content=st.one_of(document_bytes, form_text.map(lambda t: t.encode())),
    name=st.sampled_from(["a.pdf", "a.docx", "a.txt", "a.md", "a", "a.exe"]),
)
def test_a_document_upload_never_answers_500(world, content, name):
    client = logged_in(world["user"])
    upload = SimpleUploadedFile(name, content)
    check(lambda: client.post("/jobs/new/", {"workload": world["document"].pk, "document": upload}))


review_fields = {
    "action": st.one_of(st.sampled_from(["approve", "retry", "reject"]), form_values),
    "reason": form_values,
    "note": form_values,
    "corrected_output": form_values,
    "provider": st.one_of(numbers.map(str), form_values),
    "model": form_values,
    "temperature": st.one_of(numbers.map(str), form_values),
    "prompt": form_values,
    "query": form_values,
}


@FUZZ
@given(
    action=st.sampled_from(["bulk", "claim", "release", "approve", "correct", "retry", "reject"]),
    data=st.data(),
    items=st.lists(st.one_of(numbers.map(str), form_values), max_size=3),
)
def test_the_review_forms_never_answer_500(world, action, data, items):
    client = logged_in(world["reviewer"])
    url = "/review/bulk/" if action == "bulk" else f"/review/{world['item'].pk}/{action}/"
    fields = data.draw(
        mutated({"action": "approve", "reason": "r", "corrected_output": "ok"}, review_fields)
    )
    body = urlencoded(fields)
    for item in [*items, str(world["item"].pk)][: max(1, len(items))]:
        body += b"&" + urlencoded({"items": item})
    check(lambda: client.post(url, data=body, content_type="application/x-www-form-urlencoded"))


@FUZZ
@given(username=form_values, password=form_values)
def test_login_never_answers_500(world, username, password, settings):
    # A refused login hashes the password once: a fast hasher keeps the examples quick.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    client = Client(raise_request_exception=True)
    body = urlencoded({"username": username, "password": password})
    check(lambda: client.post("/accounts/login/", data=body,
                              content_type="application/x-www-form-urlencoded"))  # fmt: skip


# --- the parsers -------------------------------------------------------------------------------


def storable(value: str) -> bool:
    return inputs.text_problem(value) == ""


@FUZZ
@given(content=file_bytes)
def test_the_batch_parsers_only_ever_give_rows_that_can_be_stored(content):
    for parse in (parsing.parse_csv, parsing.parse_jsonl):
        parsed = parse(content, max_rows=50)
        assert all(storable(column) for column in parsed.columns)
        for row in parsed.rows:
            if not row.error:
                assert all(storable(k) and storable(v) for k, v in row.data.items())


@FUZZ
@given(
    content=document_bytes,
    name=st.sampled_from(["a.pdf", "a.docx", "a.txt", "a.md", "a"]),
)
def test_document_extraction_fails_only_with_a_message_and_gives_storable_text(
    content, name, settings
):
    try:
        text = documents.extract(name, content).text
    except documents.DocumentError as exc:
        text = str(exc)
        assert text  # a refusal says why
    assert storable(text)
