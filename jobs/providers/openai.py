"""Any OpenAI-compatible Chat Completions endpoint: OpenAI, Azure-style base URLs, vLLM,
Ollama, LiteLLM, and the built-in simulator."""

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
    label_confidence,
)


class OpenAIProvider(BaseProvider):
    default_base_url = "https://api.openai.com/v1"

    def headers(self) -> dict[str, str]:
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, request: CompletionRequest) -> dict[str, Any]:
        messages = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.append({"role": "user", "content": request.user_prompt})
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_output_tokens,
            "temperature": request.temperature,
        }
        if request.labels:
            body["logprobs"] = True
            body["top_logprobs"] = min(5, len(request.labels))
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema},
            }
        if request.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def complete(
        self, request: CompletionRequest, on_delta: DeltaCallback | None = None
    ) -> Completion:
        body = self.body(request)
        if request.stream:
            return self._complete_streaming(body, on_delta)
        response = self.post("/chat/completions", json=body, headers=self.headers())
        if response.status_code >= 400:
            raise ProviderError.from_response(response, error_message(response))
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ProviderError(
                f"malformed response: {exc!r}", retryable=True, error_class="malformed_response"
            )
        finish_reason = choice.get("finish_reason") or ""
        completion = Completion(
            text=text,
            tokens_in=int(usage.get("prompt_tokens") or 0),
            tokens_out=int(usage.get("completion_tokens") or 0),
            finish_reason=finish_reason,
            confidence=_first_token_confidence(choice),
            status=response.status_code,
        )
        _raise_on_refusal(completion)
        return completion

    def _complete_streaming(
        self, body: dict[str, Any], on_delta: DeltaCallback | None
    ) -> Completion:
        parts: list[str] = []
        tokens_in = tokens_out = 0
        finish_reason = ""
        confidence = None
        for _event, payload in self.stream_lines(
            "/chat/completions", json=body, headers=self.headers()
        ):
            if payload == "[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            usage = chunk.get("usage")
            if usage:
                tokens_in = int(usage.get("prompt_tokens") or 0)
                tokens_out = int(usage.get("completion_tokens") or 0)
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    parts.append(delta)
                    if on_delta:
                        on_delta(delta)
                if confidence is None:
                    confidence = _first_token_confidence(choice)
                finish_reason = choice.get("finish_reason") or finish_reason
        completion = Completion(
            text="".join(parts),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=finish_reason,
            confidence=confidence,
        )
        _raise_on_refusal(completion)
        return completion


def _first_token_confidence(choice: dict[str, Any]) -> float | None:
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return None
    return label_confidence(content[0].get("logprob"))


def _raise_on_refusal(completion: Completion) -> None:
    if completion.finish_reason == "content_filter":
        raise ProviderError(
            "the provider refused the request (content filter)",
            retryable=False,
            status=completion.status,
            error_class="refusal",
        )
