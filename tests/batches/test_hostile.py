"""Batches against hostile files (issue 18): formulas in the header, text that is not text,
JSON nested too deep, and rows stored before they were checked."""

from __future__ import annotations

import csv
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from batches import export, services
from batches.models import Batch, BatchRow
from batches.parsing import parse_jsonl
from jobs.models import Workload


@pytest.fixture
def notes(provider) -> Workload:
    return Workload.objects.create(
        name="Notes", kind=Workload.Kind.SUMMARIZE, provider=provider, model="sim-small"
    )


def download(client, batch) -> tuple[list[str], list[list[str]]]:
    response = client.get(f"/batches/{batch.code}/results.csv")
    assert response.status_code == 200
    body = b"".join(response.streaming_content).decode("utf-8-sig")
    header, *rows = list(csv.reader(io.StringIO(body)))
    return header, rows


# Only SQLite can hold such a row: PostgreSQL refuses a lone surrogate in a JSON column itself,
# so on PostgreSQL no row stored before the edge checks can be like that.
sqlite_only = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="PostgreSQL cannot store a lone surrogate in JSON"
)


def jsonl_batch(workload, user, text: str) -> Batch:
    return services.do_create_batch(
        workload=workload, filename="rows.jsonl", data=text.encode(), user=user
    )


def test_a_formula_as_a_column_name_is_neutralised_in_the_results_header(notes, user, user_client):
    data = b'input,=HYPERLINK("http://evil.example"),@SUM(A1)\nhello,x,y\n'
    batch = services.do_create_batch(workload=notes, filename="f.csv", data=data, user=user)
    header, rows = download(user_client, batch)
    assert header[2] == '\'=HYPERLINK("http://evil.example")'
    assert header[3] == "'@SUM(A1)"
    assert rows[0][:2] == ["1", "hello"]


@pytest.mark.parametrize(
    "value", ["-inf", "+nan", "-Infinity", "+infinity", "-NaN", "-1e5+cmd", "=1", "@x", "\t1"]
)
def test_every_cell_that_a_spreadsheet_would_run_is_neutralised(value):
    assert export._safe(value) == "'" + value


@pytest.mark.parametrize("value", ["-1", "+2.5", "-0.00000001", "1e-3", "-3E+4", "plain", ""])
def test_plain_numbers_and_text_are_left_alone(value):
    assert export._safe(value) == value


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"input": "\\ud800"}', "lone surrogate"),
        ('{"\\udfff": "x", "input": "y"}', "lone surrogate"),
        ('{"input": "a\\u0000b"}', "NUL"),
        ('{"input": ' + "[" * 100_000 + "}", "nests deeper than 32 levels"),
        ('{"input": ' + "[" * 40 + "]" * 40 + "}", "nests deeper than 32 levels"),
    ],
)
def test_a_jsonl_line_that_is_not_text_or_nests_too_deep_is_that_rows_error(line, problem):
    parsed = parse_jsonl(f'{line}\n{{"input": "fine"}}\n'.encode(), max_rows=10)
    assert problem in parsed.rows[0].error
    assert parsed.rows[1].data == {"input": "fine"}
    assert not parsed.rows[1].error
    assert all("\ud800" not in column and "\udfff" not in column for column in parsed.columns)


def test_an_upload_holding_a_lone_surrogate_keeps_its_page_and_results_whole(
    notes, user, user_client
):
    batch = jsonl_batch(notes, user, '{"input": "\\ud800"}\n{"input": "fine"}\n')
    page = user_client.get(batch.get_absolute_url())
    assert page.status_code == 200
    assert "lone surrogate" in page.content.decode()
    header, rows = download(user_client, batch)
    assert [row[0] for row in rows] == ["1", "2"]
    assert rows[0][header.index("status")] == "invalid"


@sqlite_only
def test_a_batch_already_holding_such_a_row_still_renders(notes, user, user_client):
    """Rows stored before the check (straight into the JSON column) must not break a page."""
    batch = jsonl_batch(notes, user, '{"input": "fine"}\n')
    BatchRow.objects.create(
        batch=batch, number=2, data={"input": "bad \ud800 text"}, input_data={"input": "\ud800"}
    )
    Batch.objects.filter(pk=batch.pk).update(columns=["input", "col \udfff"], total_rows=2)
    page = user_client.get(batch.get_absolute_url())
    assert page.status_code == 200
    assert "\ufffd" in page.content.decode()
    header, rows = download(user_client, batch)
    assert len(rows) == 2
    assert rows[1][1] == "bad \ufffd text"
    assert header[2] == "col \ufffd"


def test_a_rejected_upload_answers_400_with_the_form(notes, user_client):
    upload = SimpleUploadedFile("empty.csv", b"just,a,header\n", content_type="text/csv")
    response = user_client.post(
        "/batches/new/", {"workload": notes.pk, "file": upload, "priority": "low"}
    )
    assert response.status_code == 400
    assert "no data rows" in response.content.decode()
    assert not Batch.objects.exists()
    response = user_client.post("/batches/new/", {"workload": 10**30})
    assert response.status_code == 400
    assert not Batch.objects.exists()


@sqlite_only
def test_a_stored_row_that_is_not_text_is_invalid_and_the_rest_still_run(notes, user, redis_conn):
    batch = jsonl_batch(notes, user, '{"input": "fine"}\n{"input": "also fine"}\n')
    BatchRow.objects.filter(batch=batch, number=1).update(input_data={"input": "\ud800"})
    services.do_start_batch(Batch.objects.get(pk=batch.pk))
    first, second = BatchRow.objects.filter(batch=batch).order_by("number")
    assert "lone surrogate" in first.error
    assert first.job is None
    assert second.job is not None
