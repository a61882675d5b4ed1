"""Wire conformance against the official SDKs (`openai`, `anthropic`: test-only dependencies).

Requests: every body aiqueue's providers post, for every workload kind and option, is checked
against the SDK's own request type (`CompletionCreateParams*`, `MessageCreateParams*`): no key
the type does not have, no value of the wrong type, nothing required missing.

Answers: the providers are fed responses and streams built from the SDK's response types
(success, usage chunks, refusals, error bodies, mid-stream errors), and the same bytes go to the
SDK's own client, so both must read them alike: the same text and usage, and both fail where the
SDK raises. The seam is the provider's httpx client (an httpx MockTransport); the SDKs run on
their own HTTP library, given the same bytes.
"""

from __future__ import annotations

import collections.abc
import json
import types
import typing
from typing import Any, get_args, get_origin, get_type_hints

import anthropic
import httpx
import httpx2
import openai
import pytest
import typing_extensions
from anthropic.types import message_create_params
from openai.types.chat import completion_create_params

from jobs import kinds, services
from jobs.models import Provider, Workload
from jobs.providers.base import (
    Completion,
    CompletionRequest,
    OutOfCredit,
    ProviderError,
)
from jobs.providers.registry import PROVIDER_CLASSES

pytestmark = pytest.mark.django_db

SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "total": {"type": "number"}},
    "required": ["vendor", "total"],
}

# --------------------------------------------------------------------------- a strict checker


def _strip(tp: Any) -> Any:
    """Required[X] / NotRequired[X] / Annotated[X, ...] → X."""
    while True:
        origin = get_origin(tp)
        if origin in (typing.Required, typing.NotRequired, typing_extensions.Required,
                      typing_extensions.NotRequired, typing.Annotated):  # fmt: skip
            tp = get_args(tp)[0]
        elif isinstance(tp, typing_extensions.TypeAliasType):
            tp = tp.__value__
        else:
            return tp


def _is_required(tp: Any) -> bool:
    return get_origin(tp) in (typing.Required, typing_extensions.Required)


def check(value: Any, tp: Any, path: str = "body") -> None:
    """Raise AssertionError unless `value` is a valid instance of the SDK type `tp`."""
    tp = _strip(tp)
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return
    if typing_extensions.is_typeddict(tp):
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        hints = get_type_hints(tp, include_extras=True)
        unknown = set(value) - set(hints)
        assert not unknown, f"{path}: {sorted(unknown)} not in {tp.__name__}"
        missing = {k for k, hint in hints.items() if _is_required(hint)} - set(value)
        assert not missing, f"{path}: required {sorted(missing)} missing ({tp.__name__})"
        for key, item in value.items():
            check(item, hints[key], f"{path}.{key}")
        return
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                check(value, option, path)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: {value!r} matches no option: {'; '.join(errors)}")
    if origin is typing.Literal:
        assert value in args, f"{path}: {value!r} not one of {args}"
        return
    if tp is type(None):
        assert value is None, f"{path}: expected null, got {value!r}"
        return
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        if args:
            for key, item in value.items():
                check(key, args[0], f"{path} key")
                check(item, args[1], f"{path}.{key}")
        return
    if origin in (list, tuple, collections.abc.Iterable, collections.abc.Sequence) or (
        getattr(tp, "__name__", "") == "SequenceNotStr"
    ):
        assert isinstance(value, list), f"{path}: expected an array, got {value!r}"
        item_type = args[0] if args else Any
        for index, item in enumerate(value):
            check(item, item_type, f"{path}[{index}]")
        return
    if tp in (bool, int, float):
        # JSON numbers: an int is a valid float, a bool is neither.
        allowed = {bool: (bool,), int: (int,), float: (int, float)}[tp]
        is_number = isinstance(value, allowed) and (tp is bool or not isinstance(value, bool))
        assert is_number, f"{path}: expected {tp.__name__}, got {value!r}"
    elif tp is str:
        assert isinstance(value, str), f"{path}: expected a string, got {value!r}"
    else:
        raise AssertionError(f"{path}: the checker does not know {tp!r}")


def test_the_checker_catches_what_it_must():
    # A checker that cannot fail proves nothing: these bodies are wrong in one way each.
    openai_type = completion_create_params.CompletionCreateParamsNonStreaming
    good = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    check(good, openai_type)
    for bad in (
        {**good, "max_output_tokens": 5},  # not a parameter of the API
        {"model": "gpt-4o-mini"},  # messages missing
        {**good, "messages": [{"role": "robot", "content": "hi"}]},
        {**good, "temperature": "hot"},
    ):
        with pytest.raises(AssertionError):
            check(bad, openai_type)
    anthropic_type = message_create_params.MessageCreateParamsNonStreaming
    with pytest.raises(AssertionError, match="temperature"):
        check({**good, "max_tokens": 5, "temperature": 0.0}, anthropic_type)


# --------------------------------------------------------------------------- request bodies


def _provider(kind: str, **fields) -> Provider:
    return Provider.objects.create(
        name=f"{kind} {Provider.objects.count()}", kind=kind, base_url="http://mock/v1", **fields
    )


def _workloads(provider: Provider) -> list[Workload]:
    common = {"provider": provider, "model": "gpt-4o-mini", "system_prompt": "Be precise."}
    return [
        Workload.objects.create(
            name=f"classify {provider.pk}", kind="classify", labels=["a", "b"], **common
        ),
        Workload.objects.create(
            name=f"extract {provider.pk}", kind="extract", output_schema=SCHEMA, **common
        ),
        Workload.objects.create(name=f"summarize {provider.pk}", kind="summarize", **common),
        Workload.objects.create(
            name=f"generate {provider.pk}", kind="generate", temperature=0.7, **common
        ),
    ]


def requests_sent_by_aiqueue(provider: Provider) -> list[CompletionRequest]:
    """The requests aiqueue builds for a job of every kind (with and without a temperature)."""
    built = []
    for workload in _workloads(provider):
        job, _ = services.do_submit_job(
            workload=workload, input_text="Invoice from ACME, total 12.50 EUR", user=None
        )
        built.append(kinds.build_request(job))
    return built


def posted_bodies(kind: str, **provider_fields) -> list[tuple[dict, httpx.Headers]]:
    """Every (body, headers) the provider posts for aiqueue's requests, as captured on the
    wire; each answered with a minimal valid response so the call completes."""
    seen: list[tuple[dict, httpx.Headers]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((body, request.headers))
        if kind == "anthropic":
            if body.get("stream"):
                return sse_response(anthropic_stream_frames("ok"))
            return httpx.Response(200, json=anthropic_message("ok"))
        if body.get("stream"):
            return sse_response(openai_stream_frames("ok"))
        return httpx.Response(200, json=openai_completion("a"))

    provider = _provider(kind, **provider_fields)
    client = mocked_provider(provider, handler)
    for request in requests_sent_by_aiqueue(provider):
        client.complete(request, on_delta=lambda _text: None)
    return seen


@pytest.mark.parametrize("limit_field", ["max_completion_tokens", "max_tokens"])
def test_every_openai_request_body_is_valid_for_the_sdk(limit_field):
    bodies = posted_bodies("openai", max_tokens_field=limit_field)
    assert len(bodies) == 4
    for body, _headers in bodies:
        kind = (
            completion_create_params.CompletionCreateParamsStreaming
            if body.get("stream")
            else completion_create_params.CompletionCreateParamsNonStreaming
        )
        check(body, kind)
        assert limit_field in body
    assert [("temperature" in body) for body, _ in bodies] == [False, False, False, True]


def test_every_anthropic_request_body_is_valid_for_the_sdk():
    bodies = posted_bodies("anthropic")
    assert len(bodies) == 4
    for body, headers in bodies:
        if "temperature" in body:
            # Set by the workload: sent, as asked (the current SDK's type no longer has it, and
            # the admin says current models refuse it); everything else must conform.
            body = {k: v for k, v in body.items() if k != "temperature"}
        kind = (
            message_create_params.MessageCreateParamsStreaming
            if body.get("stream")
            else message_create_params.MessageCreateParamsNonStreaming
        )
        check(body, kind)
        assert headers["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION
    assert [("temperature" in body) for body, _ in bodies] == [False, False, False, True]


# --------------------------------------------------------------------------- answers, OpenAI


def mocked_provider(provider: Provider, handler):
    return PROVIDER_CLASSES[provider.kind](
        provider, httpx.Client(transport=httpx.MockTransport(handler))
    )


def sse_response(frames: list[str]) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content="".join(frames).encode()
    )


def openai_completion(text: str | None, *, refusal: str | None = None, finish="stop") -> dict:
    from openai.types.chat import ChatCompletion

    completion = ChatCompletion(
        id="chatcmpl-1",
        object="chat.completion",
        created=1,
        model="gpt-4o-mini",
        choices=[
            {
                "index": 0,
                "finish_reason": finish,
                "logprobs": None,
                "message": {"role": "assistant", "content": text, "refusal": refusal},
            }
        ],
        usage={"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38},
    )
    return completion.model_dump(mode="json")


def openai_chunk(delta: dict | None = None, *, finish=None, usage=None) -> str:
    from openai.types.chat import ChatCompletionChunk

    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        created=1,
        model="gpt-4o-mini",
        choices=choices,
        usage=usage,
    )
    return f"data: {json.dumps(chunk.model_dump(mode='json', exclude_unset=True))}\n\n"


def openai_stream_frames(text: str, *, field: str = "content", error: dict | None = None):
    frames = [openai_chunk({"role": "assistant", "content": ""})]
    words = text.split(" ")
    for index, word in enumerate(words):
        if error is not None and index == len(words) // 2:
            return [*frames, f"data: {json.dumps({'error': error})}\n\n"]
        frames.append(openai_chunk({field: word if index == 0 else " " + word}))
    frames.append(openai_chunk({}, finish="stop"))
    frames.append(
        openai_chunk(usage={"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38})
    )
    return [*frames, "data: [DONE]\n\n"]


def same_bytes(response: httpx.Response) -> httpx2.Client:
    """An HTTP client for the official SDKs that answers with `response`'s bytes."""

    def handler(_request):
        return httpx2.Response(
            response.status_code, headers=dict(response.headers), content=response.content
        )

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def sdk_openai(response: httpx.Response) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://mock/v1",
        max_retries=0,
        http_client=same_bytes(response),
    )


def ours(kind: str, response: httpx.Response, **request) -> Completion:
    provider = mocked_provider(_provider(kind), lambda _r: response)
    return provider.complete(
        CompletionRequest(model="gpt-4o-mini", user_prompt="hi", **request),
        on_delta=lambda _text: None,
    )


def test_openai_answer_reads_like_the_sdk():
    response = httpx.Response(200, json=openai_completion("The total is 12.50 EUR."))
    completion = ours("openai", response)
    sdk = sdk_openai(response).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.text == sdk.choices[0].message.content
    assert (completion.tokens_in, completion.tokens_out) == (
        sdk.usage.prompt_tokens,
        sdk.usage.completion_tokens,
    )


def test_openai_stream_with_a_usage_chunk_reads_like_the_sdk():
    response = sse_response(openai_stream_frames("The total is 12.50 EUR."))
    completion = ours("openai", response, stream=True)
    chunks = list(
        sdk_openai(response).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next(c.usage for c in chunks if c.usage)
    assert completion.text == text == "The total is 12.50 EUR."
    assert (completion.tokens_in, completion.tokens_out) == (31, 7)
    assert usage.completion_tokens == 7


def test_openai_refusal_is_a_refusal_not_an_empty_answer():
    refusal = "I can't help with extracting that."
    response = httpx.Response(200, json=openai_completion(None, refusal=refusal))
    sdk = sdk_openai(response).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert sdk.choices[0].message.refusal == refusal
    assert sdk.choices[0].message.content is None
    with pytest.raises(ProviderError) as error:
        ours("openai", response, json_schema=SCHEMA)
    assert error.value.error_class == "refusal"
    assert error.value.billed
    assert error.value.usage == (31, 7)

    streamed = sse_response(openai_stream_frames(refusal, field="refusal"))
    with pytest.raises(ProviderError, match="refused") as error:
        ours("openai", streamed, stream=True)
    assert error.value.usage == (31, 7)


def test_openai_mid_stream_error_raises_like_the_sdk():
    error = {"message": "The server had an error", "type": "server_error", "code": None}
    response = sse_response(openai_stream_frames("The total is 12.50 EUR.", error=error))
    with pytest.raises(openai.APIError):
        list(
            sdk_openai(response).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    with pytest.raises(ProviderError) as raised:
        ours("openai", response, stream=True)
    assert raised.value.error_class == "stream_error"
    assert raised.value.billed


@pytest.mark.parametrize(
    ("code", "expected"),
    [("rate_limit_exceeded", ProviderError), ("insufficient_quota", OutOfCredit)],
)
def test_openai_429s_told_apart_where_the_sdk_cannot(code, expected):
    body = {"error": {"message": "limit", "type": code, "param": None, "code": code}}
    response = httpx.Response(429, json=body, headers={"retry-after": "2"})
    with pytest.raises(openai.RateLimitError):  # the SDK raises the same error for both
        sdk_openai(response).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(ProviderError) as raised:
        ours("openai", response)
    assert type(raised.value) is expected
    assert raised.value.retryable is (expected is ProviderError)
    assert not raised.value.billed


def test_openai_logprobs_give_the_classification_confidence():
    from openai.types.chat import ChatCompletion

    data = ChatCompletion(
        id="c",
        object="chat.completion",
        created=1,
        model="gpt-4o-mini",
        choices=[
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "billing"},
                "logprobs": {
                    "content": [
                        {"token": "billing", "logprob": -0.105, "bytes": None, "top_logprobs": []}
                    ],
                    "refusal": None,
                },
            }
        ],
    ).model_dump(mode="json")
    completion = ours("openai", httpx.Response(200, json=data), labels=["billing", "bug"])
    assert completion.confidence == pytest.approx(0.9003, abs=1e-4)


# --------------------------------------------------------------------------- answers, Anthropic


def anthropic_message(text: str, *, stop_reason="end_turn", stop_details=None) -> dict:
    from anthropic.types import Message

    message = Message(
        id="msg_1",
        type="message",
        role="assistant",
        model="claude-sonnet-4-5",
        content=[{"type": "text", "text": text}] if text else [],
        stop_reason=stop_reason,
        stop_details=stop_details,
        stop_sequence=None,
        usage={
            "input_tokens": 20,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 100,
            "output_tokens": 9,
        },
    )
    return message.model_dump(mode="json")


def _event(model) -> str:
    data = model.model_dump(mode="json", exclude_unset=True)
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"


def anthropic_stream_frames(text: str, *, error: dict | None = None, stop_reason="end_turn"):
    from anthropic.types import (
        RawContentBlockDeltaEvent,
        RawContentBlockStartEvent,
        RawContentBlockStopEvent,
        RawMessageDeltaEvent,
        RawMessageStartEvent,
        RawMessageStopEvent,
    )

    start = {**anthropic_message(""), "stop_reason": None}
    start["usage"] = {"input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 1}
    frames = [
        _event(RawMessageStartEvent(type="message_start", message=start)),
        'event: ping\ndata: {"type": "ping"}\n\n',
        _event(
            RawContentBlockStartEvent(
                type="content_block_start", index=0, content_block={"type": "text", "text": ""}
            )
        ),
    ]
    words = text.split(" ")
    for index, word in enumerate(words):
        if error is not None and index == len(words) // 2:
            body = json.dumps({"type": "error", "error": error})
            return [*frames, f"event: error\ndata: {body}\n\n"]
        delta = {"type": "text_delta", "text": word if index == 0 else " " + word}
        frames.append(
            _event(RawContentBlockDeltaEvent(type="content_block_delta", index=0, delta=delta))
        )
    frames.append(_event(RawContentBlockStopEvent(type="content_block_stop", index=0)))
    frames.append(
        _event(
            RawMessageDeltaEvent(
                type="message_delta",
                delta={"stop_reason": stop_reason, "stop_sequence": None},
                usage={"output_tokens": 9},
            )
        )
    )
    frames.append(_event(RawMessageStopEvent(type="message_stop")))
    return frames


def sdk_anthropic(response: httpx.Response) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sk-test", base_url="http://mock", max_retries=0, http_client=same_bytes(response)
    )


ANTHROPIC_CALL = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [
    {"role": "user", "content": "hi"}]}  # fmt: skip


def test_anthropic_message_reads_like_the_sdk_with_cache_tokens_billed():
    response = httpx.Response(200, json=anthropic_message("The total is 12.50 EUR."))
    sdk = sdk_anthropic(response).messages.create(**ANTHROPIC_CALL)
    completion = ours("anthropic", response)
    assert completion.text == sdk.content[0].text
    usage = sdk.usage
    billed_in = (
        usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    )
    assert (completion.tokens_in, completion.tokens_out) == (billed_in, usage.output_tokens)


def test_anthropic_stream_events_read_like_the_sdk():
    response = sse_response(anthropic_stream_frames("The total is 12.50 EUR."))
    events = list(sdk_anthropic(response).messages.create(**ANTHROPIC_CALL, stream=True))
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    completion = ours("anthropic", response, stream=True)
    assert completion.text == text == "The total is 12.50 EUR."
    assert (completion.tokens_in, completion.tokens_out) == (120, 9)
    assert completion.finish_reason == "end_turn"


def test_anthropic_error_event_mid_stream_raises_like_the_sdk():
    error = {"type": "overloaded_error", "message": "Overloaded"}
    response = sse_response(anthropic_stream_frames("The total is 12.50 EUR.", error=error))
    with pytest.raises(anthropic.APIStatusError):
        list(sdk_anthropic(response).messages.create(**ANTHROPIC_CALL, stream=True))
    with pytest.raises(ProviderError) as raised:
        ours("anthropic", response, stream=True)
    assert raised.value.error_class == "stream_error"
    assert raised.value.retryable
    assert raised.value.billed


def test_anthropic_refusal_is_billed_and_not_retried():
    details = {"type": "refusal", "category": None, "explanation": "Not something I can do."}
    response = httpx.Response(
        200, json=anthropic_message("", stop_reason="refusal", stop_details=details)
    )
    sdk = sdk_anthropic(response).messages.create(**ANTHROPIC_CALL)
    assert sdk.stop_reason == "refusal"
    with pytest.raises(ProviderError) as raised:
        ours("anthropic", response)
    assert raised.value.error_class == "refusal"
    assert not raised.value.retryable
    assert raised.value.usage == (125, 9)
    assert "Not something I can do." in raised.value.message


@pytest.mark.parametrize(
    ("status", "kind", "sdk_error", "ours_expected", "retryable"),
    [
        (529, "overloaded_error", anthropic.OverloadedError, ProviderError, True),
        (402, "billing_error", anthropic.PaymentRequiredError, OutOfCredit, False),
        (429, "rate_limit_error", anthropic.RateLimitError, ProviderError, True),
    ],
)
def test_anthropic_error_bodies(status, kind, sdk_error, ours_expected, retryable):
    from anthropic.types import BetaErrorResponse

    body = BetaErrorResponse(type="error", error={"type": kind, "message": "no"}).model_dump(
        mode="json", exclude_none=True
    )
    response = httpx.Response(status, json=body)
    with pytest.raises(sdk_error):
        sdk_anthropic(response).messages.create(**ANTHROPIC_CALL)
    with pytest.raises(ProviderError) as raised:
        ours("anthropic", response)
    assert type(raised.value) is ours_expected
    assert raised.value.retryable is retryable
    assert not raised.value.billed
