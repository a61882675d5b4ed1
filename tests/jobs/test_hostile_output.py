"""Model output that no column or page can hold (a lone surrogate or a NUL, spelled by the
answer's JSON escapes): the job still ends, and its pages render. The simulator never answers
so, hence the mock at the provider's HTTP seam."""

from __future__ import annotations

import json

import httpx
import pytest

from jobs import services
from jobs.models import Job, Workload
from jobs.providers import registry

# The worker runs the job after the submit commits (the enqueue is an on-commit callback).
pytestmark = pytest.mark.django_db


@pytest.fixture
def answers(monkeypatch):
    """Every provider call is answered with the next of these chat completion texts."""
    texts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        text = texts.pop(0)
        usage = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
        # json.dumps escapes: the lone surrogate travels as "\ud800", as over the wire.
        if json.loads(request.content).get("stream"):
            chunks = [
                {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": usage},
            ]
            body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks)
            body += "data: [DONE]\n\n"
            return httpx.Response(
                200, content=body.encode(), headers={"content-type": "text/event-stream"}
            )
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = {"id": "c1", "object": "chat.completion", "choices": [choice], "usage": usage}
        return httpx.Response(200, content=json.dumps(body).encode())

    client = httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(registry, "client_for", lambda provider: client)
    return texts


def test_a_lone_surrogate_or_nul_in_an_answer_is_stored_as_a_replacement_character(
    redis_conn, workload, user, run_worker, user_client, answers
):
    answers.append("a summary with \ud800 and \x00 in it")
    job, _ = services.do_submit_job(workload=workload, input_text="notes", user=user)
    run_worker()
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
    assert job.output_text == "a summary with \ufffd and \ufffd in it"
    assert user_client.get(job.get_absolute_url()).status_code == 200


def test_a_json_answer_whose_escapes_spell_a_lone_surrogate_is_invalid_output(
    redis_conn, provider, user, run_worker, answers
):
    extract = Workload.objects.create(
        name="Extract",
        kind=Workload.Kind.EXTRACT,
        provider=provider,
        model="sim-small",
        max_attempts=1,
        output_schema={"type": "object"},
    )
    answers.extend(['{"name": "\\ud800"}', '{"name": "\\udfff"}'])  # the answer and its repair
    job, _ = services.do_submit_job(workload=extract, input_text="a letter", user=user)
    run_worker()
    job.refresh_from_db()
    assert job.status == Job.Status.NEEDS_REVIEW
    assert "lone surrogate" in job.review_items.get().evidence["problem"]
