from __future__ import annotations

import json
from datetime import timedelta

import pytest
import redis
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import services
from jobs.models import ApiToken, Job


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
        ("delete", "/api/jobs", "GET, HEAD, POST"),
        ("post", f"/api/jobs/{job.code}", "GET, HEAD"),
        ("get", f"/api/jobs/{job.code}/cancel", "POST"),
    ):
        response = getattr(client, method)(path, headers=auth)
        assert response.status_code == 405
        assert response["Content-Type"] == "application/json"
        assert response["Allow"] == allowed
        assert "is not allowed here" in response.json()["error"]
    response = client.put("/api/jobs")  # no credentials: still JSON, never the HTML page
    assert response.status_code in (401, 405)
    assert response["Content-Type"] == "application/json"


# Issue 18: hostile input is refused at the edge with a 400 that says why, never a 500.


def post_raw(client: Client, raw: str | bytes, **headers):
    return client.post("/api/jobs", data=raw, content_type="application/json", headers=headers)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[" * 100_000, "nests deeper than 32 levels"),
        ('{"workload": "Summaries", "input": "x", "extra": ' + "[" * 40 + "]" * 40 + "}", "nests"),
        ('{"workload": "Summaries", "input": "\\ud800"}', "lone surrogate"),
        ('{"workload": "\\ud800", "input": "x"}', "lone surrogate"),
        ('{"workload": "Summaries", "input": "x", "idempotency_key": "\\udfff"}', "surrogate"),
        ('{"workload": "Summaries", "input": "x", "\\ud800": 1}', "key that holds U+D800"),
        ('{"workload": "Summaries", "input": "a\\u0000b"}', "NUL"),
    ],
)
def test_json_that_is_not_text_or_nests_too_deep_is_400(client, token, workload, raw, message):
    assert_refused(post_raw(client, raw, Authorization=f"Bearer {token}"), message)


def assert_refused(response, message: str) -> None:
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Job.objects.exists()


def test_a_lone_surrogate_in_a_named_field_is_400(client, token, templated):
    raw = '{"workload": "Summaries", "fields": {"customer": "\\ud800", "topic": "t"}}'
    assert_refused(post_raw(client, raw, Authorization=f"Bearer {token}"), "lone surrogate")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("deadline", "9999-12-31T23:59:59-12:00"),
        ("start_at", "0001-01-01T00:00:00+14:00"),
        ("deadline", "9999-12-31T23:59:59+00:00"),
        ("start_at", "1800-01-01T00:00:00+00:00"),
    ],
)
def test_times_out_of_range_are_400(client, token, workload, name, value):
    body = {"workload": workload.name, "input": "x", name: value}
    assert_refused(
        post_job(client, body, Authorization=f"Bearer {token}"), f"'{name}' is out of range"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"workload": "Summaries", "input": "x", "priority": []}, "'priority' must be one of"),
        ({"workload": "Summaries", "input": "x", "priority": {}}, "'priority' must be one of"),
        ({"workload": "Summaries", "input": "x", "priority": 0}, "'priority' must be one of"),
        ({"workload": True, "input": "x"}, "'workload' must be"),
        ({"workload": [], "input": "x"}, "'workload' must be"),
        ({"workload": 1.0, "input": "x"}, "'workload' must be"),
        ({"workload": 10**30, "input": "x"}, "'workload' is out of range"),
        ({"workload": -1, "input": "x"}, "'workload' is out of range"),
        ({"workload": "Summaries", "input": "x", "idempotency_key": 7}, "must be a string"),
        ({"workload": "Summaries", "input": "x", "idempotency_key": "k" * 201}, "200"),
        ({"workload": "Summaries", "input": "x", "deadline": 1e300}, "ISO 8601"),
    ],
)
def test_wrong_json_types_are_400(client, token, workload, body, message):
    assert_refused(post_job(client, body, Authorization=f"Bearer {token}"), message)


def test_an_idempotency_header_over_200_characters_is_400(client, token, workload):
    # Cut to 200, two different keys sharing a prefix would have returned each other's job.
    response = post_job(
        client,
        {"workload": workload.name, "input": "x"},
        Authorization=f"Bearer {token}",
        **{"Idempotency-Key": "k" * 201},
    )
    assert response.status_code == 400
    assert "200" in response.json()["error"]


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_a_token_request_to_an_unknown_api_address_is_json_404(token, method):
    client = Client(enforce_csrf_checks=True)  # a program's client: no cookie, no CSRF token
    response = getattr(client, method)(
        "/api/nope", data="{}", content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"


def test_a_session_request_without_csrf_token_is_json_403(user, workload):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    for path in ("/api/jobs", "/api/nope"):
        response = (
            post_job(browser, {"workload": workload.name, "input": "x"})
            if path == ("/api/jobs")
            else browser.post(path, data="{}", content_type="application/json")
        )
        assert response["Content-Type"] == "application/json", path
        assert response.status_code in (403, 404), path
    assert not Job.objects.exists()


def test_a_crash_under_api_answers_json_500(client, token, workload, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(services, "do_submit_job", boom)
    client.raise_request_exception = False
    response = post_job(
        client, {"workload": workload.name, "input": "x"}, Authorization=f"Bearer {token}"
    )
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert "a bug" not in response.content.decode()


def test_a_form_encoded_body_over_the_limit_under_api_is_json_413(user, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    browser.get("/jobs/new/")  # sets the CSRF cookie; the token then comes in the form body
    token = browser.cookies["csrftoken"].value
    response = browser.post("/api/jobs", data={"csrfmiddlewaretoken": token, "x": "x" * 5_000})
    assert response.status_code == 413
    assert response["Content-Type"] == "application/json"


def test_a_job_set_aside_says_what_it_waits_for(client, token, workload):
    start = (timezone.now() + timedelta(hours=2)).isoformat()
    response = post_job(
        client,
        {"workload": workload.name, "input": "hello", "start_at": start},
        Authorization=f"Bearer {token}",
    )
    assert response.status_code == 202, response.content
    body = client.get(
        f"/api/jobs/{response.json()['code']}", HTTP_AUTHORIZATION=f"Bearer {token}"
    ).json()
    assert (body["status"], body["wait_kind"]) == ("scheduled", "scheduled")
    assert body["wait_reason"].startswith("scheduled to start at")


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        ({"customer": "ACME", "topic": "the late invoice"}, None),
        ({"customer": "ACME", "topic": "  \t"}, "topic"),  # blank is missing, in every way in
    ],
)
def test_named_fields_read_the_same_from_the_form_the_api_and_a_batch(
    client, token, templated, user, redis_conn, values, refused
):
    from batches.models import BatchRow
    from jobs.forms import SubmitJobForm
    from tests.factories import make_batch

    api = post_job(
        client, {"workload": templated.name, "fields": values}, Authorization=f"Bearer {token}"
    )
    form = SubmitJobForm(
        data={"workload": templated.pk, **{f"field_{k}": v for k, v in values.items()}}
    )
    batch = make_batch(templated, user, [list(values), list(values.values())])
    row = BatchRow.objects.get(batch=batch)
    if refused is None:
        assert api.status_code == 202, api.content
        job = Job.objects.get()
        assert form.is_valid(), form.errors
        assert (form.cleaned_data["input_text"], form.cleaned_data["input_data"]) == (
            job.input_text,
            job.input_data,
        )
        assert (row.error, row.input_data) == ("", job.input_data)
    else:
        assert api.status_code == 400
        assert f"missing or empty: {refused}" in api.json()["error"]
        assert not form.is_valid()
        assert form.errors[f"field_{refused}"] == ["Enter a value."]
        assert row.error.startswith(f"empty value for {refused!r}")


def test_a_submission_makes_six_statements_and_two_redis_round_trips(
    client, token, workload, redis_conn, monkeypatch, django_capture_on_commit_callbacks
):
    # The lean submit path (bench/submit.py): a regression here shows as CPU per submission.
    def submit():
        with django_capture_on_commit_callbacks(execute=True):
            response = post_job(
                client, {"workload": workload.name, "input": "x"}, Authorization=f"Bearer {token}"
            )
        assert response.status_code == 202

    submit()  # connections opened, the token's last use recorded
    sent = []  # one packed send per round trip, a pipeline's commands all in one
    real_send = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(
        redis.connection.Connection,
        "send_packed_command",
        lambda self, command, *a, **kw: (
            sent.append(b"".join(command)) or real_send(self, command, *a, **kw)
        ),
    )
    with CaptureQueriesContext(connection) as queries:
        submit()

    statements = [query["sql"].split()[0] for query in queries.captured_queries]
    # token, workload; the row, the budgets that apply, the event (in the test's savepoint)
    assert statements == ["SELECT", "SELECT", "SAVEPOINT", "INSERT", "SELECT", "INSERT", "RELEASE"]
    assert len(sent) == 2, sent
    watchers, enqueue = sorted(sent, key=lambda packet: b"MULTI" in packet)
    assert b"ZRANGEBYSCORE" in watchers  # is anyone watching the job or the lists
    for command in (b"SADD", b"HSET", b"EVAL", b"EXEC"):  # registration, hash, fair push
        assert command in enqueue
    assert b"SCRIPT" not in enqueue
    assert Job.objects.count() == 2
    assert len(redis_conn.lrange("rq:queue:default", 0, -1)) == 2
