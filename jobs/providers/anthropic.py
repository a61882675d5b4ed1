"""Anthropic's Messages API.

Parameters are sent only when set: current models refuse `temperature` (the current SDK's
request type no longer has it), so it goes out only when a workload or a reviewer's retry
sets one. The API version is a provider setting (`Provider.anthropic_version`, defaulting to
what the current SDK sends). "Overloaded" is Anthropic's own 529 (retried like a 503); a
`billing_error` is out of credit (base.from_response). Streams are the SSE events
`message_start` (input usage), `content_block_delta`, `message_delta` (output usage, stop
reason), `message_stop`, `ping`, and `error`, which ends the answer.
"""

from __future__ import annotations

import json
from typing import Any

from jobs.providers.base import (
    SCHEMA_INSTRUCTION,
    BaseProvider,
    Completion,
    CompletionRequest,
    DeltaCallback,
    ProviderError,
    error_message,
    refusal_error,
    stream_error,
)

# What the current official SDK sends (anthropic 2.15); an older account can pin its own.
DEFAULT_API_VERSION = "2026-10-21"


class AnthropicProvider(BaseProvider):
    default_base_url = "https://api.anthropic.com/v1"

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.provider.anthropic_version or DEFAULT_API_VERSION}
        key = self.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    def body(self, request: CompletionRequest) -> dict[str, Any]:
        system = request.system_prompt
        if request.json_schema is not None:
            system = f"{system}{SCHEMA_INSTRUCTION}{json.dumps(request.json_schema)}".strip()
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_output_tokens,
            "messages": [{"role": "user", "content": request.user_prompt}],
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if system:
            body["system"] = system
        if request.stream:
            body["stream"] = True
        return body

    def complete(
        self, request: CompletionRequest, on_delta: DeltaCallback | None = None
    ) -> Completion:
        body = self.body(request)
        if request.stream:
            return self._complete_streaming(body, on_delta)
        response = self.post("/messages", json=body, headers=self.headers())
        if response.status_code >= 400:
            raise ProviderError.from_response(response, error_message(response))
        try:
            data = response.json()
            text = "".join(
                block.get("text", "") for block in data["content"] if block.get("type") == "text"
            )
            tokens_in, tokens_out = _usage(data.get("usage") or {})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProviderError(
                f"malformed response: {exc!r}", retryable=True, error_class="malformed_response"
            )
        completion = Completion(
            text=text,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=data.get("stop_reason") or "",
            status=response.status_code,
        )
        _raise_on_refusal(completion, data.get("stop_details"))
        return completion

    def _complete_streaming(
        self, body: dict[str, Any], on_delta: DeltaCallback | None
    ) -> Completion:
        parts: list[str] = []
        tokens_in = tokens_out = 0
        stop_reason = ""
        stop_details = None
        for event, payload in self.stream_lines("/messages", json=body, headers=self.headers()):
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            kind = data.get("type") or event
            if kind == "message_start":
                tokens_in, tokens_out = _usage((data.get("message") or {}).get("usage") or {})
                self.call.report(tokens_in, None)
            elif kind == "content_block_delta":
                delta = (data.get("delta") or {}).get("text")
                if delta:
                    parts.append(delta)
                    if on_delta:
                        on_delta(delta)
            elif kind == "message_delta":
                # Usage here is cumulative; input counts appear when the server revises them.
                usage = data.get("usage") or {}
                if usage.get("input_tokens") is not None:
                    tokens_in = _usage(usage)[0]
                tokens_out = int(usage.get("output_tokens") or tokens_out)
                delta = data.get("delta") or {}
                stop_reason = delta.get("stop_reason") or stop_reason
                stop_details = delta.get("stop_details") or stop_details
            elif kind == "message_stop":
                self.call.report(tokens_in, tokens_out)
            elif kind == "error":
                # Generation had begun: billed, at the input reported so far.
                raise stream_error(data.get("error"), usage=None)
        completion = Completion(
            text="".join(parts),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=stop_reason,
        )
        _raise_on_refusal(completion, stop_details)
        return completion


def _usage(usage: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens billed. Input is the sum of the uncached, cache-writing and
    cache-reading tokens, as Anthropic's usage object defines it."""
    tokens_in = sum(
        int(usage.get(name) or 0)
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    return tokens_in, int(usage.get("output_tokens") or 0)


def _raise_on_refusal(completion: Completion, details: Any) -> None:
    if completion.finish_reason == "refusal":
        explanation = (details or {}).get("explanation") if isinstance(details, dict) else None
        raise refusal_error(
            explanation or "stop_reason refusal",
            status=completion.status,
            usage=(completion.tokens_in, completion.tokens_out),
        )
