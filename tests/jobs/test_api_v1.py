"""Issue 20: what the API says to a program building on it: idempotency conflicts, money on
replayed answers, try-later answers, the job list and its cursor, replay, batches."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from batches.models import Batch
from jobs import services
from jobs.models import ApiToken, Job


@pytest.fixture
def auth(user) -> dict:
    api_token = ApiToken(user=user, name="ci")
    key = api_token.set_new_key()
    api_token.save()
    return {"Authorization": f"Bearer {key}"}


def post(client, path: str, body, headers: dict, content_type="application/json"):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, data=data, content_type=content_type, headers=headers)


def test_an_idempotency_key_reused_with_another_body_is_422(client, auth, workload):
    headers = {**auth, "Idempotency-Key": "k-1"}
    first = post(client, "/api/jobs", {"workload": workload.name, "input": "x"}, headers)
    again = post(client, "/api/jobs", {"workload": workload.name, "input": "y"}, headers)
    assert first.status_code == 202
    assert again.status_code == 422
    assert again.json()["job"] == first.json()["code"]
    assert "different input" in again.json()["error"]
    assert Job.objects.count() == 1


def test_a_replayed_answer_formats_money_as_the_first_did(client, auth, workload):
    headers = {**auth, "Idempotency-Key": "k-2"}
    first = post(client, "/api/jobs", {"workload": workload.name, "input": "x"}, headers).json()
    replayed = post(client, "/api/jobs", {"workload": workload.name, "input": "x"}, headers).json()
    for field in ("cost_usd", "cost_reserved_usd"):
        assert first[field] == replayed[field], field
    assert first["cost_usd"] == "0.00000000"


def test_a_paused_workload_is_503_with_retry_after(client, auth, workload):
    workload.is_paused = True
    workload.save()
    response = post(client, "/api/jobs", {"workload": workload.name, "input": "x"}, auth)
    assert response.status_code == 503
    assert response["Retry-After"] == str(services.PAUSED_RETRY_AFTER)
    assert response.json()["retry_after"] == services.PAUSED_RETRY_AFTER
    assert not Job.objects.exists()


def test_a_key_used_before_the_pause_still_finds_its_job(client, auth, workload):
    headers = {**auth, "Idempotency-Key": "k-3"}
    first = post(client, "/api/jobs", {"workload": workload.name, "input": "x"}, headers)
    workload.is_paused = True
    workload.save()
    again = post(client, "/api/jobs", {"workload": workload.name, "input": "x"}, headers)
    assert again.status_code == 200
    assert again.json()["code"] == first.json()["code"]


def make_jobs(workload, user, count: int) -> list[Job]:
    """Jobs a second apart, oldest first (the list shows them newest first)."""
    start = timezone.now() - timedelta(hours=1)
    made = []
    for n in range(count):
        job = services.do_submit_job(workload=workload, input_text=f"note {n}", user=user)[0]
        Job.objects.filter(pk=job.pk).update(created_at=start + timedelta(seconds=n))
        made.append(job)
    return made


def test_the_list_pages_by_cursor_and_stays_stable_under_inserts(client, auth, workload, user):
    made = make_jobs(workload, user, 5)
    first = client.get("/api/jobs?limit=2", headers=auth).json()
    assert [j["code"] for j in first["results"]] == [str(made[4].code), str(made[3].code)]
    # Jobs submitted meanwhile (now, so newest) neither repeat nor skip a row of the next pages.
    services.do_submit_job(workload=workload, input_text="late 1", user=user)
    services.do_submit_job(workload=workload, input_text="late 2", user=user)
    seen = [j["code"] for j in first["results"]]
    page = first
    while page["next"]:
        page = client.get(page["next"], headers=auth).json()
        seen += [j["code"] for j in page["results"]]
    assert seen == [str(job.code) for job in reversed(made)]


def test_the_list_filters(client, auth, workload, user, other_user):
    made = make_jobs(workload, user, 3)
    services.do_submit_job(workload=workload, input_text="someone else's", user=other_user)
    Job.objects.filter(pk=made[0].pk).update(status=Job.Status.FAILED)

    def codes(query: str) -> list[str]:
        response = client.get(f"/api/jobs?{query}", headers=auth)
        assert response.status_code == 200, response.content
        return [j["code"] for j in response.json()["results"]]

    assert len(codes("")) == 3  # only the user's own
    assert codes("status=failed") == [str(made[0].code)]
    assert len(codes("status=failed,queued")) == 3
    assert codes("q=note%202") == [str(made[2].code)]
    assert codes(f"q={str(made[1].code)[:8]}") == [str(made[1].code)]
    assert len(codes(f"workload={workload.pk}")) == 3
    after = Job.objects.get(pk=made[1].pk).created_at
    assert codes(f"created_after={after.isoformat().replace('+', '%2B')}") == [
        str(made[2].code),
        str(made[1].code),
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=nope", "Unknown status"),
        ("limit=0", "'limit'"),
        ("limit=" + "9" * 5000, "'limit'"),
        ("cursor=%25%25", "'cursor'"),
        ("cursor=bm9wZQ", "'cursor'"),
        ("batch=nope", "code"),
        ("created_after=yesterday", "ISO 8601"),
        ("colour=red", "Unknown query parameter"),
        ("q=a%00b", "NUL"),
        ("workload=" + "9" * 5000, "out of range"),
    ],
)
def test_bad_list_queries_are_400(client, auth, db, query, message):
    response = client.get(f"/api/jobs?{query}", headers=auth)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_replay_makes_a_linked_job_with_the_same_input(client, auth, workload, user):
    job = services.do_submit_job(workload=workload, input_text="again", user=user)[0]
    headers = {**auth, "Idempotency-Key": "replay-1"}
    response = post(client, f"/api/jobs/{job.code}/replay", {}, headers)
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["replay_of"] == str(job.code)
    replay = Job.objects.get(code=body["code"])
    assert (replay.input_text, replay.workload, replay.replay_of) == ("again", workload, job)
    # The same key again: the same replay, not a third job.
    assert post(client, f"/api/jobs/{job.code}/replay", {}, headers).json()["code"] == body["code"]
    assert Job.objects.count() == 2


def test_replaying_someone_elses_job_is_404(client, auth, workload, other_user):
    job = services.do_submit_job(workload=workload, input_text="theirs", user=other_user)[0]
    assert post(client, f"/api/jobs/{job.code}/replay", {}, auth).status_code == 404


def test_a_replay_over_budget_is_refused_like_a_submission(client, auth, workload, user):
    job = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    workload.is_paused = True
    workload.save()
    response = post(client, f"/api/jobs/{job.code}/replay", {}, auth)
    assert response.status_code == 503
    assert "Retry-After" in response


def test_a_batch_from_json_rows_starts_and_lists_its_jobs(client, auth, workload, user):
    rows = [{"input": "first"}, {"input": "second"}, {"input": ""}]
    response = post(client, "/api/batches", {"workload": workload.name, "rows": rows}, auth)
    assert response.status_code == 201, response.content
    body = response.json()
    batch = Batch.objects.get(code=body["code"])
    assert batch.status == Batch.Status.RUNNING
    assert (body["total_rows"], body["invalid_rows"]) == (3, 1)
    assert body["row_errors"][0]["row"] == 3
    assert client.get(body["api_url"], headers=auth).json()["progress"]["in_flight"] == 2
    listed = client.get(body["jobs_url"], headers=auth).json()["results"]
    assert sorted(j["batch"] for j in listed) == [body["code"]] * 2


def test_a_batch_from_jsonl(client, auth, workload):
    data = '{"input": "one"}\n{"input": "two"}\n'
    response = post(
        client,
        f"/api/batches?workload={workload.name}&start=false",
        data,
        auth,
        content_type="application/jsonl",
    )
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "draft"
    assert response.json()["total_rows"] == 2


def test_a_batch_whose_rows_fit_no_field_leaves_nothing_behind(client, auth, workload):
    # Two columns, neither named like the workload's one input field: nothing maps.
    rows = [{"a": "1", "b": "2"}]
    response = post(client, "/api/batches", {"workload": workload.name, "rows": rows}, auth)
    assert response.status_code == 400
    assert "has no column" in response.json()["error"]
    assert not Batch.objects.exists()


def test_someone_elses_batch_is_404(client, auth, workload, other_user):
    from batches import services as batch_services

    batch = batch_services.do_create_batch(
        workload=workload, filename="x.jsonl", data=b'{"input": "x"}', user=other_user
    )
    assert client.get(f"/api/batches/{batch.code}", headers=auth).status_code == 404
    assert client.get(f"/api/batches/{batch.code}/jobs", headers=auth).status_code == 404
