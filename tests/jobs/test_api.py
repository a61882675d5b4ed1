from __future__ import annotations

import json

import pytest
from django.test import Client

from jobs import services
from jobs.models import ApiToken, Job


@pytest.fixture
def token(user) -> str:
    api_token = ApiToken(user=user, name="ci")
    key = api_token.set_new_key()
    api_token.save()
    return key


def post_job(client: Client, body: dict, **headers):
    return client.post(
        "/api/jobs", data=json.dumps(body), content_type="application/json", headers=headers
    )


def test_submit_with_token_answers_202_with_code_and_url(client, token, workload):
    response = post_job(
        client,
        {"workload": workload.name, "input": "hello", "priority": "low"},
        Authorization=f"Bearer {token}",
    )
    assert response.status_code == 202
    body = response.json()
    job = Job.objects.get()
    assert body["code"] == str(job.code)
    assert body["status"] == "queued"
    assert body["url"].endswith(job.get_absolute_url())
    assert job.priority == "low"


def test_get_job_state(client, token, workload):
    code = post_job(
        client, {"workload": workload.name, "input": "x"}, Authorization=f"Bearer {token}"
    ).json()["code"]
    Job.objects.filter(code=code).update(status="succeeded", output_text="done")
    body = client.get(f"/api/jobs/{code}", headers={"Authorization": f"Bearer {token}"}).json()
    assert body["status"] == "succeeded"
    assert body["output"] == "done"
    assert body["cost_with_chunks_usd"] is None  # only documents have chunks


def test_idempotency_key_header_returns_the_same_job(client, token, workload):
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"}
    first = post_job(client, {"workload": workload.name, "input": "x"}, **headers)
    second = post_job(client, {"workload": workload.name, "input": "x"}, **headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert first.json()["code"] == second.json()["code"]
    assert Job.objects.count() == 1


def test_without_credentials_is_401(client, workload):
    assert post_job(client, {"workload": workload.name, "input": "x"}).status_code == 401
    assert Job.objects.count() == 0


def test_bad_token_is_401(client, workload):
    response = post_job(
        client, {"workload": workload.name, "input": "x"}, Authorization="Bearer nope"
    )
    assert response.status_code == 401


def test_a_deactivated_users_token_is_401(client, token, user, workload):
    user.is_active = False
    user.save()
    response = post_job(
        client, {"workload": workload.name, "input": "x"}, Authorization=f"Bearer {token}"
    )
    assert response.status_code == 401
    assert Job.objects.count() == 0


def test_workload_by_id(client, token, workload):
    response = post_job(
        client, {"workload": workload.pk, "input": "x"}, Authorization=f"Bearer {token}"
    )
    assert response.status_code == 202
    assert Job.objects.get().workload == workload


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": "x"}, "'workload' is required"),
        ({"workload": "Nope", "input": "x"}, "Unknown workload"),
        ({"workload": 987654, "input": "x"}, "Unknown workload"),
        ({"workload": "Summaries"}, "'input' is required"),
        ({"workload": "Summaries", "input": "x", "priority": "urgent"}, "Unknown priority"),
    ],
)
def test_bad_requests_explain_themselves(client, token, workload, body, message):
    response = post_job(client, body, Authorization=f"Bearer {token}")
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert Job.objects.count() == 0


def test_malformed_json_is_400(client, token, db):
    response = client.post(
        "/api/jobs",
        data="{nope",
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 400


def test_session_auth_needs_csrf(user, workload):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    assert post_job(browser, {"workload": workload.name, "input": "x"}).status_code == 403
    assert Job.objects.count() == 0


def test_other_users_job_is_404(client, token, workload, other_user):
    from jobs import services

    job, _ = services.do_submit_job(workload=workload, input_text="x", user=other_user)
    response = client.get(f"/api/jobs/{job.code}", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404


def test_only_the_token_digest_is_stored(token):
    stored = ApiToken.objects.get()
    assert token not in (stored.digest, stored.prefix)
    assert stored.digest == ApiToken.hash_key(token)


@pytest.fixture
def templated(workload):
    workload.prompt_template = "Write to {customer} about {topic}."
    workload.save()
    return workload


def test_submit_named_fields_like_the_form(client, token, templated, redis_conn):
    response = post_job(
        client,
        {"workload": templated.name, "fields": {"customer": "ACME", "topic": "the late invoice"}},
        Authorization=f"Bearer {token}",
    )
    assert response.status_code == 202, response.content
    job = Job.objects.get()
    assert job.input_data == {"customer": "ACME", "topic": "the late invoice"}
    assert job.input_text == "customer: ACME\ntopic: the late invoice"
    from jobs import kinds

    assert kinds.build_request(job).user_prompt == "Write to ACME about the late invoice."


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": "no fields"}, "takes named fields (customer, topic)"),
        ({"fields": {"customer": "ACME"}}, "missing or empty: topic"),
        ({"fields": {"customer": "ACME", "topic": " "}}, "missing or empty: topic"),
        ({"fields": {"customer": "ACME", "topic": "x", "extra": "y"}}, "unknown: extra"),
        ({"fields": {"customer": "ACME", "topic": 5}}, "every value must be a string"),
    ],
)
def test_named_fields_errors_are_clear_and_create_nothing(client, token, templated, body, message):
    response = post_job(
        client, {"workload": templated.name, **body}, Authorization=f"Bearer {token}"
    )
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Job.objects.exists()


def test_a_document_workload_points_to_the_form(client, token, workload):
    workload.kind = "document"
    workload.save()
    response = post_job(
        client, {"workload": workload.name, "input": "x"}, Authorization=f"Bearer {token}"
    )
    assert response.status_code == 400
    assert "/jobs/new/" in response.json()["error"]
    assert not Job.objects.exists()


def test_a_body_over_the_upload_limit_gets_a_json_413(client, token, workload, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    response = post_job(
        client, {"workload": workload.name, "input": "x" * 20_000}, Authorization=f"Bearer {token}"
    )
    assert response.status_code == 413
    assert response.json() == {
        "error": "Body too large: at most 10,000 bytes.",
        "max_bytes": 10_000,
    }
    assert not Job.objects.exists()


def test_an_unknown_api_address_answers_json_404(client, token):
    for path in ("/api/job", "/api/jobs/not-a-code", "/api/jobs/42/cancel"):
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 404
        assert response["Content-Type"] == "application/json"
        assert "No such API endpoint" in response.json()["error"]


def test_a_wrong_method_answers_json_405_naming_the_allowed_ones(client, token, workload, user):
    job = services.do_submit_job(workload=workload, input_text="A note.", user=user)[0]
    auth = {"Authorization": f"Bearer {token}"}
    for method, path, allowed in (
        ("get", "/api/jobs", "POST"),
        ("post", f"/api/jobs/{job.code}", "GET, HEAD"),
        ("get", f"/api/jobs/{job.code}/cancel", "POST"),
    ):
        response = getattr(client, method)(path, headers=auth)
        assert response.status_code == 405
        assert response["Content-Type"] == "application/json"
        assert response["Allow"] == allowed
        assert "is not allowed here" in response.json()["error"]
    response = client.get("/api/jobs")  # no credentials: still JSON, never the HTML page
    assert response.status_code in (401, 405)
    assert response["Content-Type"] == "application/json"
