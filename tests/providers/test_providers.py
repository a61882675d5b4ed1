"""The provider kinds against the simulator over real HTTP: answers, streaming, usage, and the
one error taxonomy (retryable vs permanent) that runs.retries acts on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from aiqueue.redis_server import free_port
from jobs.models import Provider
from jobs.providers.base import (
    BaseProvider,
    CompletionRequest,
    OutOfCredit,
    ProviderConfigError,
    ProviderError,
    parse_retry_after,
)
from jobs.providers.openai import OpenAIProvider
from jobs.providers.registry import PROVIDER_CLASSES, get_provider

pytestmark = pytest.mark.django_db

KINDS = [Provider.Kind.OPENAI, Provider.Kind.ANTHROPIC, Provider.Kind.SIMULATED]
MODEL = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest", "simulated": "sim-small"}


def provider_of(kind: str, simulator, **fields) -> Provider:
    return Provider.objects.create(
        name=f"{kind} test {Provider.objects.count()}",
        kind=kind,
        base_url=f"{simulator.url}/v1",
        **fields,
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
@pytest.mark.parametrize("marker", ["[[refuse]]", "[[content-filter]]"])
def test_refusal_is_permanent(kind, marker, simulator):
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of(kind, simulator)).complete(
            request(kind, user_prompt=f"{marker} tell me a secret")
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


class CutStream(httpx.SyncByteStream):
    """An answer whose body breaks off after its first bytes."""

    def __iter__(self):
        yield b'{"id": "x", "choices": ['
        raise httpx.ReadError("connection reset by peer")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("failure", "billed"),
    [
        (httpx.ConnectError("connection refused"), False),
        (httpx.ConnectTimeout("connect timed out"), False),
        (httpx.ReadError("connection reset by peer"), False),
        (httpx.RemoteProtocolError("server disconnected without sending a response"), False),
        (httpx.WriteError("broken pipe"), False),
        (httpx.ReadTimeout("timed out waiting for the answer"), True),
        ("cut", True),
    ],
    ids=["refused", "connect-timeout", "reset", "hung-up", "write", "read-timeout", "cut"],
)
def test_a_lost_connection_is_billed_only_once_the_provider_took_the_request(
    failure, billed, stream, db
):
    """Before any answer (refused, reset, hung up on) the call is free: it waits rather than
    using up a paid attempt. A read timeout or an answer cut mid-way may have been billed."""

    def handler(request: httpx.Request) -> httpx.Response:
        if failure == "cut":
            return httpx.Response(200, stream=CutStream())
        raise failure

    row = Provider.objects.create(name="flaky", kind="openai", base_url="http://flaky.test/v1")
    client = httpx.Client(transport=httpx.MockTransport(handler))
    provider = OpenAIProvider(row, client)
    with pytest.raises(ProviderError) as error:
        provider.complete(request("openai", stream=stream))
    assert error.value.retryable
    assert error.value.billed is billed


@pytest.mark.parametrize("kind", KINDS)
def test_missing_key_is_a_configuration_error_that_names_the_variable(kind, simulator, monkeypatch):
    monkeypatch.delenv("TEST_UNSET_API_KEY", raising=False)
    row = provider_of(kind, simulator, api_key_env="TEST_UNSET_API_KEY")
    with pytest.raises(ProviderConfigError) as error:
        get_provider(row).complete(request(kind))
    assert "TEST_UNSET_API_KEY is not set" in error.value.message
    assert not error.value.retryable
    assert simulator.counters()["requests_total"] == 0


def test_key_is_sent_in_the_header_of_each_kind(simulator, monkeypatch):
    # The provider's own header for the key; a wrong key is a permanent 401 from a real API.
    monkeypatch.setenv("TEST_SIM_API_KEY", "sk-test-123")
    openai = get_provider(provider_of("openai", simulator, api_key_env="TEST_SIM_API_KEY"))
    anthropic = get_provider(provider_of("anthropic", simulator, api_key_env="TEST_SIM_API_KEY"))
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


# --------------------------------------------------------------------------- real answer shapes


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_credit_is_not_retried_nor_billed(kind, simulator):
    # OpenAI's billing 429 (insufficient_quota) looks like a rate limit by its status alone;
    # Anthropic's is a billing_error. Retrying never fixes either.
    simulator.control(quota_exhausted=True)
    with pytest.raises(OutOfCredit) as error:
        get_provider(provider_of(kind, simulator)).complete(request(kind))
    assert not error.value.retryable
    assert not error.value.billed
    assert error.value.error_class == "out_of_credit"


def test_old_anthropic_credit_message_is_out_of_credit(db):
    body = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API.",
        },
    }
    with pytest.raises(OutOfCredit):
        mocked("anthropic", lambda _request: httpx.Response(400, json=body)).complete(
            request("anthropic")
        )


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_that_breaks_off_with_an_error_is_not_an_answer(kind, simulator):
    simulator.control(mid_stream_error_rate=1.0)
    deltas: list[str] = []
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of(kind, simulator)).complete(
            request(kind, stream=True), on_delta=deltas.append
        )
    assert deltas  # part of the answer had arrived
    assert error.value.error_class == "stream_error"
    assert error.value.retryable  # server_error / overloaded_error: the provider's trouble
    assert error.value.billed  # generation had begun


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_is_a_billed_refusal_with_its_usage(kind, stream, simulator):
    # OpenAI: message.refusal with content null; Anthropic: stop_reason "refusal".
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of(kind, simulator)).complete(
            request(kind, user_prompt="[[refuse]] extract the fields", stream=stream)
        )
    assert error.value.error_class == "refusal"
    assert not error.value.retryable
    assert error.value.billed
    tokens_in, tokens_out = error.value.usage
    assert tokens_in > 0
    assert tokens_out > 0


def test_anthropic_overloaded_529_is_retryable_and_free(simulator):
    simulator.control(overloaded_rate=1.0)
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of("anthropic", simulator)).complete(request("anthropic"))
    assert error.value.status == 529
    assert error.value.retryable
    assert not error.value.billed
    assert error.value.error_class == "overloaded"


def test_a_429_waits_for_the_limit_that_is_used_up(simulator):
    # Tokens exhausted (reset in 1.5 s) while requests are plentiful (reset in 6 minutes).
    headers = {
        "x-ratelimit-remaining-requests": "4999",
        "x-ratelimit-reset-requests": "6m0s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1.5s",
    }
    simulator.control(script=[{"status": 429, "headers": headers}])
    with pytest.raises(ProviderError) as error:
        get_provider(provider_of("openai", simulator)).complete(request("openai"))
    assert error.value.retryable
    assert error.value.retry_after == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s",
          "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "1s"}, 20.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
          "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "5s"}, 5.0),
        ({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "1.5s"}, 1.5),
        ({"retry-after": "3", "x-ratelimit-reset-tokens": "1.5s"}, 3.0),
    ],
)  # fmt: skip
def test_reset_headers_pick_the_exhausted_limit(headers, seconds):
    assert parse_retry_after(httpx.Headers(headers)) == pytest.approx(seconds)


def test_anthropic_reset_times_are_read():
    soon = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    headers = {
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": soon,
        "anthropic-ratelimit-requests-remaining": "40",
        "anthropic-ratelimit-requests-reset": soon,
    }
    assert 25 < parse_retry_after(httpx.Headers(headers)) <= 30


# --------------------------------------------------------------------------- request options


def test_openai_sends_max_completion_tokens_unless_the_server_wants_max_tokens(simulator):
    openai = get_provider(provider_of("openai", simulator)).body(request("openai"))
    assert openai["max_completion_tokens"] == 200
    assert "max_tokens" not in openai
    compatible = provider_of("openai", simulator, max_tokens_field="max_tokens")
    body = get_provider(compatible).body(request("openai"))
    assert body["max_tokens"] == 200
    assert "max_completion_tokens" not in body


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_is_sent_only_when_set(kind, simulator):
    provider = get_provider(provider_of(kind, simulator))
    assert "temperature" not in provider.body(request(kind))
    assert provider.body(request(kind, temperature=0.3))["temperature"] == 0.3


def test_anthropic_version_is_a_provider_setting(simulator):
    default = get_provider(provider_of("anthropic", simulator))
    assert default.headers()["anthropic-version"] == anthropic_sdk_version()
    pinned = Provider.objects.create(
        name="pinned", kind="anthropic", base_url=f"{simulator.url}/v1",
        anthropic_version="2023-06-01",
    )  # fmt: skip
    assert get_provider(pinned).headers()["anthropic-version"] == "2023-06-01"


def anthropic_sdk_version() -> str:
    from anthropic._constants import ANTHROPIC_API_VERSION

    return ANTHROPIC_API_VERSION


def mocked(kind: str, handler) -> BaseProvider:
    """A provider of `kind` whose HTTP goes to `handler` (the one seam tests may mock)."""
    row = Provider.objects.create(name=f"mocked {kind}", kind=kind, base_url="http://mock/v1")
    cls = PROVIDER_CLASSES[kind]
    return cls(row, httpx.Client(transport=httpx.MockTransport(handler)))
