"""Any OpenAI-compatible Chat Completions endpoint: OpenAI, Azure-style base URLs, vLLM,
Ollama, LiteLLM, and the built-in simulator.

What differs between them is a provider setting, not a guess: OpenAI (and Azure) take the
output limit as `max_completion_tokens` (`max_tokens` is deprecated there and refused by
reasoning models), older OpenAI-compatible servers only know `max_tokens`
(`Provider.max_tokens_field`). `temperature` is sent only when the workload (or a reviewer's
retry) sets one.

Answers are read as the official SDK reads them: a refusal is `message.refusal` with
`content: null` (streamed: `delta.refusal`), a stream can end in an `{"error": ...}` chunk, and
a 429 whose error is `insufficient_quota` is billing, not a rate limit (base.from_response).
"""

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
    mean_token_confidence,
    refusal_error,
    stream_error,
)

MAX_COMPLETION_TOKENS = "max_completion_tokens"


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
        limit_field = self.provider.max_tokens_field or MAX_COMPLETION_TOKENS
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            limit_field: request.max_output_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.labels:
            body["logprobs"] = True
            body["top_logprobs"] = min(5, len(request.labels))
        elif request.logprobs:
            body["logprobs"] = True
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
            return self._complete_streaming(body, on_delta, by_label=bool(request.labels))
        response = self.post("/chat/completions", json=body, headers=self.headers())
        if response.status_code >= 400:
            raise ProviderError.from_response(response, error_message(response))
        try:
            data = response.json()
            if isinstance(data.get("error"), dict):  # a 200 that carries an error
                raise stream_error(data["error"])
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            refusal = message.get("refusal") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ProviderError(
                f"malformed response: {exc!r}", retryable=True, error_class="malformed_response"
            )
        completion = Completion(
            text=text,
            tokens_in=int(usage.get("prompt_tokens") or 0),
            tokens_out=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason") or "",
            confidence=_confidence([choice], by_label=bool(request.labels)),
            status=response.status_code,
        )
        _raise_on_refusal(completion, refusal)
        return completion

    def _complete_streaming(
        self, body: dict[str, Any], on_delta: DeltaCallback | None, *, by_label: bool = False
    ) -> Completion:
        parts: list[str] = []
        refusal: list[str] = []
        tokens_in = tokens_out = 0
        finish_reason = ""
        choices: list[dict[str, Any]] = []  # each chunk's, for the logprobs they carry
        for _event, payload in self.stream_lines(
            "/chat/completions", json=body, headers=self.headers()
        ):
            if payload == "[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                # What the SDK raises on: the answer broke off; the text so far is not it.
                raise stream_error(chunk["error"])
            usage = chunk.get("usage")
            if usage:
                tokens_in = int(usage.get("prompt_tokens") or 0)
                tokens_out = int(usage.get("completion_tokens") or 0)
                self.call.report(tokens_in, tokens_out)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("refusal"):
                    refusal.append(delta["refusal"])
                text = delta.get("content")
                if text:
                    parts.append(text)
                    if on_delta:
                        on_delta(text)
                if choice.get("logprobs"):
                    choices.append(choice)
                finish_reason = choice.get("finish_reason") or finish_reason
        completion = Completion(
            text="".join(parts),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=finish_reason,
            confidence=_confidence(choices, by_label=by_label),
        )
        _raise_on_refusal(completion, "".join(refusal))
        return completion


def _confidence(choices: list[dict[str, Any]], *, by_label: bool) -> float | None:
    """From the logprobs of the answer's tokens (`choices`: the answer's, or each streamed
    chunk's): a label's is its first token's probability, any other answer's the geometric
    mean over its tokens (base.mean_token_confidence). None without logprobs."""
    entries = [
        entry
        for choice in choices
        for entry in ((choice.get("logprobs") or {}).get("content") or [])
        if isinstance(entry, dict) and isinstance(entry.get("logprob"), int | float)
    ]
    if not entries:
        return None
    if by_label:
        return label_confidence(entries[0]["logprob"])
    return mean_token_confidence(sum(entry["logprob"] for entry in entries), len(entries))


def _raise_on_refusal(completion: Completion, refusal: str) -> None:
    """A refusal (`message.refusal`, the model declining a structured output) or OpenAI's
    or Azure's content filter: not an empty answer to judge or repair."""
    if refusal or completion.finish_reason == "content_filter":
        raise refusal_error(
            refusal or "the content filter stopped the answer",
            status=completion.status,
            usage=(completion.tokens_in, completion.tokens_out),
        )
