"""Anthropic's Messages API."""

from __future__ import annotations

import json
from typing import Any

from jobs.providers.base import (
    BaseProvider,
    Completion,
    CompletionRequest,
    DeltaCallback,
    ProviderError,
    error_message,
)

API_VERSION = "2023-06-01"


class AnthropicProvider(BaseProvider):
    default_base_url = "https://api.anthropic.com/v1"

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        key = self.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    def body(self, request: CompletionRequest) -> dict[str, Any]:
        system = request.system_prompt
        if request.json_schema is not None:
            system = (
                f"{system}\n\nAnswer with one JSON object that validates against this JSON "
                f"Schema, and nothing else:\n{json.dumps(request.json_schema)}"
            ).strip()
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "messages": [{"role": "user", "content": request.user_prompt}],
        }
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
            usage = data.get("usage") or {}
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                f"malformed response: {exc!r}", retryable=True, error_class="malformed_response"
            )
        completion = Completion(
            text=text,
            tokens_in=int(usage.get("input_tokens") or 0),
            tokens_out=int(usage.get("output_tokens") or 0),
            finish_reason=data.get("stop_reason") or "",
            status=response.status_code,
        )
        _raise_on_refusal(completion)
        return completion

    def _complete_streaming(
        self, body: dict[str, Any], on_delta: DeltaCallback | None
    ) -> Completion:
        parts: list[str] = []
        tokens_in = tokens_out = 0
        stop_reason = ""
        for event, payload in self.stream_lines("/messages", json=body, headers=self.headers()):
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            kind = data.get("type") or event
            if kind == "message_start":
                usage = (data.get("message") or {}).get("usage") or {}
                tokens_in = int(usage.get("input_tokens") or 0)
                tokens_out = int(usage.get("output_tokens") or 0)
            elif kind == "content_block_delta":
                delta = (data.get("delta") or {}).get("text")
                if delta:
                    parts.append(delta)
                    if on_delta:
                        on_delta(delta)
            elif kind == "message_delta":
                usage = data.get("usage") or {}
                tokens_out = int(usage.get("output_tokens") or tokens_out)
                stop_reason = (data.get("delta") or {}).get("stop_reason") or stop_reason
            elif kind == "error":
                error = data.get("error") or {}
                raise ProviderError(
                    f"stream error: {error.get('message', error)}",
                    retryable=error.get("type") in {"overloaded_error", "api_error"},
                    error_class=str(error.get("type") or "stream_error"),
                )
        completion = Completion(
            text="".join(parts),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=stop_reason,
        )
        _raise_on_refusal(completion)
        return completion


def _raise_on_refusal(completion: Completion) -> None:
    if completion.finish_reason == "refusal":
        raise ProviderError(
            "the provider refused the request",
            retryable=False,
            status=completion.status,
            error_class="refusal",
        )
