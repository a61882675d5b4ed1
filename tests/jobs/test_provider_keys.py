"""A provider's API key variable may only name a provider key (issue 18, defect 1): an operator
with `change_provider` could otherwise send REDIS_URL, DATABASE_URL (with its password) or the
secret key to a host of their choosing as the bearer token."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from jobs import services
from jobs.models import Job, Provider, Workload
from jobs.providers.base import ProviderConfigError
from jobs.providers.registry import get_provider

SECRET = "redis://:hunter2-secret@127.0.0.1:6399/0"


class Listener:
    """An HTTP server that records what it was sent and answers like an OpenAI endpoint."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                listener.requests.append(dict(self.headers))
                body = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "ok"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", ["REDIS_URL", "DATABASE_URL", "AIQUEUE_SECRET_KEY"])
def test_a_worker_never_sends_the_apps_own_settings_as_a_key(
    name, listener, monkeypatch, user, run_worker
):
    monkeypatch.setenv(name, SECRET)
    # Written straight to the table, as an old row or a bypassed form would be.
    provider = Provider.objects.create(
        name="Listener", kind=Provider.Kind.OPENAI, base_url=listener.url, api_key_env=name
    )
    workload = Workload.objects.create(
        name="Leak", kind=Workload.Kind.GENERATE, provider=provider, model="m", max_attempts=1
    )
    job, _ = services.do_submit_job(workload=workload, input_text="hello", user=user)
    run_worker()
    assert not any(SECRET in value for sent in listener.requests for value in sent.values())
    assert listener.requests == []  # refused before anything was sent
    job.refresh_from_db()
    assert job.status == Job.Status.NEEDS_REVIEW
    assert "not a provider key" in job.error or "does not look like" in job.error
    assert SECRET not in job.error


def test_a_key_variable_that_looks_like_one_is_sent(listener, monkeypatch, user, run_worker, db):
    monkeypatch.setenv("LISTENER_API_KEY", "sk-test")
    provider = Provider.objects.create(
        name="Listener",
        kind=Provider.Kind.OPENAI,
        base_url=listener.url,
        api_key_env="LISTENER_API_KEY",
    )
    assert get_provider(provider).api_key() == "sk-test"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("REDIS_URL", "is one of aiqueue's own settings"),
        ("DATABASE_URL", "is one of aiqueue's own settings"),
        ("AIQUEUE_SECRET_KEY", "is one of aiqueue's own settings"),
        ("AIQUEUE_OPENAI_API_KEY", "is one of aiqueue's own settings"),
        ("HOME", "does not look like a provider key"),
        ("openai_api_key", "does not look like a provider key"),
    ],
)
def test_the_provider_refuses_other_variables_and_says_why(name, message, db):
    provider = Provider(name="P", kind=Provider.Kind.OPENAI, api_key_env=name)
    with pytest.raises(ValidationError) as caught:
        provider.full_clean()
    assert message in str(caught.value.message_dict["api_key_env"])
    with pytest.raises(ProviderConfigError, match="refused"):
        get_provider(provider).api_key()


def test_an_allow_list_replaces_the_pattern(settings, monkeypatch, db):
    settings.AIQUEUE_PROVIDER_KEY_VARS = ["AZURE_OPENAI_KEY"]
    monkeypatch.setenv("AZURE_OPENAI_KEY", "k")
    Provider(name="P", kind=Provider.Kind.OPENAI, api_key_env="AZURE_OPENAI_KEY").full_clean()
    assert get_provider(Provider(name="P", api_key_env="AZURE_OPENAI_KEY")).api_key() == "k"
    with pytest.raises(ValidationError, match="AIQUEUE_PROVIDER_KEY_VARS"):
        Provider(name="Q", kind=Provider.Kind.OPENAI, api_key_env="OPENAI_API_KEY").full_clean()
    settings.AIQUEUE_PROVIDER_KEY_VARS = ["REDIS_URL"]  # never, even when listed
    with pytest.raises(ValidationError, match="own settings"):
        Provider(name="R", kind=Provider.Kind.OPENAI, api_key_env="REDIS_URL").full_clean()


def test_the_admin_form_says_which_names_it_takes(client, db):
    admin = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    page = client.get("/admin/jobs/provider/add/").content.decode()
    assert "_API_KEY" in page  # the help text names the rule
    response = client.post(
        "/admin/jobs/provider/add/",
        {
            "name": "Leaky",
            "kind": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": "DATABASE_URL",
            "connect_timeout_s": "5",
            "read_timeout_s": "60",
            "retry_budget_ratio": "0.1",
            "breaker_failure_threshold": "5",
            "breaker_cooldown_s": "30",
            "is_active": "on",
            "prices-TOTAL_FORMS": "0",
            "prices-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200
    assert "is one of aiqueue&#x27;s own settings" in response.content.decode()
    assert not Provider.objects.filter(name="Leaky").exists()


def test_the_admin_never_says_whether_a_refused_variable_is_set(client, monkeypatch, db):
    monkeypatch.setenv("DATABASE_URL", SECRET)
    admin = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    Provider.objects.create(name="Old", kind=Provider.Kind.OPENAI, api_key_env="DATABASE_URL")
    page = client.get("/admin/jobs/provider/").content.decode()
    assert "set (DATABASE_URL)" not in page
    assert "refused" in page
