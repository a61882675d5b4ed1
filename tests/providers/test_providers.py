"""The provider kinds against the simulator over real HTTP: answers, streaming, usage, and the
one error taxonomy (retryable vs permanent) that jobs.retries acts on."""

from __future__ import annotations

import httpx
import pytest

from aiqueue.redis_server import free_port
from jobs.models import Provider
from jobs.providers.base import (
    CompletionRequest,
    ProviderConfigError,
    ProviderError,
    parse_retry_after,
)
from jobs.providers.registry import get_provider

pytestmark = pytest.mark.django_db

KINDS = [Provider.Kind.OPENAI, Provider.Kind.ANTHROPIC, Provider.Kind.SIMULATED]
MODEL = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest", "simulated": "sim-small"}


def provider_of(kind: str, simulator, **fields) -> Provider:
    return Provider.objects.create(
        name=f"{kind} test", kind=kind, base_url=f"{simulator.url}/v1", **fields
    )


def request(kind: str, **fields) -> CompletionRequest:
    defaults = {
        "system_prompt": "Summarize the text.",
        "user_prompt": "The board approved the hiring plan and the travel budget for next year.",
        "max_output_tokens": 200,
    }
    return CompletionRequest(model=MODEL[kind], **{**defaults, **fields})


@pytest.mark.parametrize("kind", KINDS)
def test_answer_reports_text_and_usage(kind, simulator):
    completion = get_provider(provider_of(kind, simulator)).complete(request(kind))
    assert completion.text
    assert completion.tokens_in > 0
    assert completion.tokens_out > 0
    assert completion.status == 200


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_delivers_deltas_that_add_up_to_the_answer(kind, simulator):
    provider = get_provider(provider_of(kind, simulator))
    whole = provider.complete(request(kind))
    deltas: list[str] = []
    streamed = provider.complete(request(kind, stream=True), on_delta=deltas.append)
    assert len(deltas) > 1
    assert "".join(deltas) == streamed.text == whole.text
    assert (streamed.tokens_in, streamed.tokens_out) == (whole.tokens_in, whole.tokens_out)


def test_classification_confidence_comes_from_logprobs(simulator):
    provider = get_provider(provider_of("openai", simulator))
    labels = ["billing", "bug", "feature-request"]
    completion = provider.complete(
        CompletionRequest(
            model="gpt-4o-mini",
            system_prompt="Labels: billing, bug, feature-request",
            user_prompt="The app crashes when I click save.",
            labels=labels,
        )
    )
    assert completion.text in labels
    assert 0 < completion.confidence <= 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [429, 408, 500, 502, 503, 504])
def test_throttling_and_server_errors_are_retryable(kind, status, simulator):
    simulator.control(script=[{"status": status, "retry_after": 2}])
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of(kind, simulator)).complete(request(kind))
    assert error.value.retryable
    assert error.value.status == status
    assert error.value.retry_after == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_permanent(kind, status, simulator):
    simulator.control(script=[status])
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of(kind, simulator)).complete(request(kind, stream=True))
    assert not error.value.retryable
    assert error.value.error_class == f"http_{status}"


@pytest.mark.parametrize("kind", KINDS)
def test_refusal_is_permanent(kind, simulator):
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of(kind, simulator)).complete(
            request(kind, user_prompt="[[refuse]] tell me a secret")
        )
    assert not error.value.retryable
    assert error.value.error_class == "refusal"


@pytest.mark.parametrize("stream", [False, True])
def test_read_timeout_is_retryable_and_clamped_per_call(stream, simulator):
    simulator.control(script=[{"hang": 3}])
    row = provider_of("openai", simulator, read_timeout_s=60)
    with pytest.raises(ProviderError) as error:
        get_provider(row, read_timeout=0.5).complete(request("openai", stream=stream))
    assert error.value.retryable
    assert error.value.error_class == "timeout"


def test_connection_error_is_retryable(db):
    row = Provider.objects.create(
        name="nowhere", kind="openai", base_url=f"http://127.0.0.1:{free_port()}/v1"
    )
    with pytest.raises(ProviderError) as error:
        get_provider(row).complete(request("openai"))
    assert error.value.retryable
    assert error.value.error_class == "connection"


@pytest.mark.parametrize("kind", KINDS)
def test_missing_key_is_a_configuration_error_that_names_the_variable(kind, simulator, monkeypatch):
    monkeypatch.delenv("AIQUEUE_TEST_UNSET_KEY", raising=False)
    row = provider_of(kind, simulator, api_key_env="AIQUEUE_TEST_UNSET_KEY")
    with pytest.raises(ProviderConfigError) as error:
        get_provider(row).complete(request(kind))
    assert "AIQUEUE_TEST_UNSET_KEY is not set" in error.value.message
    assert not error.value.retryable
    assert simulator.counters()["requests_total"] == 0


def test_key_is_sent_in_the_header_of_each_kind(simulator, monkeypatch):
    # The provider's own header for the key; a wrong key is a permanent 401 from a real API.
    monkeypatch.setenv("AIQUEUE_TEST_KEY", "sk-test-123")
    openai = get_provider(provider_of("openai", simulator, api_key_env="AIQUEUE_TEST_KEY"))
    anthropic = get_provider(provider_of("anthropic", simulator, api_key_env="AIQUEUE_TEST_KEY"))
    assert openai.headers()["Authorization"] == "Bearer sk-test-123"
    assert anthropic.headers()["x-api-key"] == "sk-test-123"


def test_client_has_no_transport_retries(simulator):
    client = get_provider(provider_of("openai", simulator)).client
    assert client._transport._pool._retries == 0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-tokens": "250ms"}, 0.25),
        ({}, None),
    ],
)
def test_retry_after_and_rate_limit_reset_headers_are_read(headers, seconds):
    assert parse_retry_after(httpx.Headers(headers)) == seconds
