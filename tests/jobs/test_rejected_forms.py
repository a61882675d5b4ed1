"""One convention for a rejected form (issue 18, defects 6 and 7): 400 with the form and its
errors, on every page, and htmx is told to swap it in."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Job, Workload


@pytest.fixture
def document_workload(provider) -> Workload:
    return Workload.objects.create(
        name="Docs", kind=Workload.Kind.DOCUMENT, provider=provider, model="sim-small"
    )


@pytest.mark.parametrize(
    ("key", "problem"),
    [("k" * 201, "at most 200 characters"), ("bad\x00key", "Null characters are not allowed")],
)
def test_a_refused_submission_key_is_said_and_answers_400(user_client, workload, key, problem):
    response = user_client.post(
        "/jobs/new/", {"workload": workload.pk, "input_text": "hello", "idempotency_key": key}
    )
    assert response.status_code == 400
    page = response.content.decode()
    assert "submission key was refused" in page
    assert problem in page
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "data",
    [
        {"input_text": "   "},
        {"input_text": "x", "deadline": "2001-01-01T00:00"},
        {"input_text": "x", "start_at": "9999-12-31T23:59"},
        {"input_text": "x", "priority": "urgent"},
    ],
)
def test_a_rejected_job_form_answers_400(user_client, workload, data):
    response = user_client.post("/jobs/new/", {"workload": workload.pk, **data})
    assert response.status_code == 400
    assert 'class="error"' in response.content.decode()
    assert not Job.objects.exists()


def test_a_start_time_out_of_range_says_so(user_client, workload):
    response = user_client.post(
        "/jobs/new/", {"workload": workload.pk, "input_text": "x", "start_at": "9999-12-31T23:59"}
    )
    assert "out of range" in response.content.decode()


def assert_document_refused(client, workload, data: bytes, message: str) -> None:
    upload = SimpleUploadedFile("a.pdf", data, content_type="application/pdf")
    response = client.post("/jobs/new/", {"workload": workload.pk, "document": upload})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Job.objects.exists()


def test_a_rejected_document_upload_answers_400(user_client, document_workload):
    assert_document_refused(
        user_client, document_workload, b"\x00\x01 not a pdf", "not a supported document"
    )


def test_a_rejected_login_answers_400(client, user):
    response = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert response.status_code == 400
    assert "Your username and password didn" in response.content.decode()


def test_a_valid_form_is_not_touched_by_the_convention(user_client, workload, client, user):
    assert user_client.get("/jobs/new/").status_code == 200
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"})
    assert response.status_code == 302


def test_htmx_swaps_a_400(user_client):
    page = user_client.get("/jobs/new/").content.decode()
    config = json.loads(re.search(r"name=\"htmx-config\" content='([^']*)'", page).group(1))
    rules = config["responseHandling"]
    first_400 = next(r for r in rules if re.fullmatch(r["code"].replace(".", r"\d"), "400"))
    assert first_400["swap"] is True
    first_500 = next(r for r in rules if re.fullmatch(r["code"].replace(".", r"\d"), "500"))
    assert first_500["swap"] is False


def test_an_invalid_simulator_fault_form_answers_400(client, db, settings):
    admin = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    response = client.post(
        "/operator/simulator/",
        {"latency_ms": "-5", "error_rate": "7"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 400
    assert "Not applied" in response.content.decode()
    response = client.post("/operator/simulator/", {"latency_ms": "-5", "error_rate": "7"})
    assert response.status_code == 400


@pytest.mark.parametrize("text", ["a \ud800 b", "a \x00 b"])
def test_a_document_whose_text_cannot_be_stored_is_refused(
    user_client, document_workload, monkeypatch, text
):
    from jobs import documents

    monkeypatch.setattr(documents, "_pdf_text", lambda filename, data: text)
    assert_document_refused(
        user_client, document_workload, b"%PDF-1.4\n...", "cannot be read as text"
    )
