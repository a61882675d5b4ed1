"""The built-in simulated AI provider: a standalone HTTP server (stdlib + uvicorn, no Django).

It speaks enough of the OpenAI Chat Completions API and the Anthropic Messages API for aiqueue's
providers to run against it, with realistic latency, token usage, logprobs, streaming, and
faults that can be switched on while it runs.

Run it:

    python -m simulator --host 127.0.0.1 --port 8100 \
        [--seed 0] [--latency-ms 800] [--api-key KEY]

It prints ``simulator listening on http://HOST:PORT`` once it accepts connections and exits
cleanly on SIGINT/SIGTERM (--port 0 picks a free port; the line names it). In-process:
``create_app(api_key=None, **config)`` returns the ASGI app; its config is what reset restores.

Endpoints
    POST /v1/chat/completions   OpenAI-compatible (stream, logprobs, response_format).
    POST /v1/messages           Anthropic Messages API shape (stream with Anthropic SSE events).
    GET  /v1/models             A small model list (any model name is accepted, though).
    GET  /_control              {"config": {...}, "counters": {...}}
    PUT  /_control              Merge a JSON object into the config; returns the same shape.
                                {"reset_counters": true} in the body also zeroes the counters.
                                An unknown key or a bad value answers 400 naming the key, and
                                then nothing is applied.
    POST /_control/reset        Counters AND config back to the start-up defaults.

With --api-key, the /v1 endpoints require ``Authorization: Bearer KEY`` or ``x-api-key: KEY``
(401 otherwise). The control endpoints never need a key: bind to localhost.

Config keys (all switchable at run time through PUT /_control)
    latency_ms             mean latency added to every answer (default: --latency-ms, 800)
    latency_jitter_ms      uniform +/- spread around latency_ms (0)
    stream_chunk_delay_ms  pause between streamed content chunks (20)
    error_rate             0..1, fraction of requests answered with error_status (0)
    error_status           status for error_rate and outage failures, 400..599 (503)
    rate_limit_rate        0..1, fraction answered 429 straight away (0)
    retry_after_s          Retry-After on 429s, also sent as x-ratelimit-reset-requests "Ns" (1)
    timeout_rate           0..1, fraction that hang for timeout_hang_s and then answer 504 (0)
    timeout_hang_s         how long those requests hang (30)
    outage                 true: every request fails with error_status (false)
    overloaded_rate        0..1, fraction answered "overloaded": 529 overloaded_error on
                           /v1/messages (Anthropic's own status), 503 on the OpenAI API (0)
    refusal_rate           0..1, fraction the model refuses: OpenAI's message.refusal with
                           content null (delta.refusal when streamed), Anthropic's stop_reason
                           "refusal"; billed like an answer (0)
    mid_stream_error_rate  0..1, fraction of streamed answers that break half-way with the
                           real APIs' error chunk (OpenAI: a `data: {"error": {...}}` chunk;
                           Anthropic: an `event: error`) and end there (0)
    quota_exhausted        true: the account is out of credit: every request answers OpenAI's
                           429 insufficient_quota / Anthropic's 402 billing_error (false)
    ratelimit_requests,    the account's limits per minute, reported on every answer as
    ratelimit_tokens       x-ratelimit-{limit,remaining,reset}-{requests,tokens} (OpenAI; reset
                           as "1.5s", "6m0s") or anthropic-ratelimit-{requests,tokens}-*
                           (10000, 2000000)
    ratelimit_enforce      true: a request that does not fit answers 429 with those headers and
                           no Retry-After (false)
    seed                   seeds the fault dice and the answers (default: --seed, 0)
    script                 queue of outcomes, one consumed per completion request BEFORE
                           quota, limits, outage and the rates apply ([]). PUT replaces the
                           whole queue. Items: 503 (a status; 200 means a normal answer),
                           {"status": 429, "retry_after": 5}, {"status": 200},
                           {"hang": 10} (hang 10 s then 504; add "status" to answer that
                           status after the hang instead), {"fault": "quota" | "overloaded" |
                           "refusal" | "mid_stream_error"}, and "headers": {"name": "value"}
                           on any item to add or replace response headers.

One draw per request decides among 429 / timeout / error / overloaded / refusal / mid-stream
error, in that order of precedence, so the rates are exact fractions as long as they add up to
at most 1. Failures come after the latency sleep (a real provider fails slowly too), except 429
which answers at once.

Counters (since the last reset)
    requests_total, by_outcome {"ok", "refused", "rate_limited", "timeout", "bad_request",
    "unauthorized", "quota", "overloaded", "mid_stream_error", "error_<status>"},
    prompt_tokens and completion_tokens (what the answered requests are billed: refusals
    included, a broken stream for what it sent), in_flight, peak_in_flight (completion
    requests between arrival and the end of their response or stream; a client that
    disconnects ends its request early), disconnected (requests whose client went away
    before the answer was complete: a cancelled call).
    Outcomes are counted when decided, so a hang shows up as "timeout" at once.

Answers are deterministic for the same messages, model and seed:
    classification  a line "Labels: a, b, c" in any message; the answer is one label, with
                    logprobs when asked. Markers in the last user message: [[low-confidence]]
                    (p = 0.35), [[invalid-label]] (answers "unknown-label").
    extraction      response_format json_object / json_schema (for /v1/messages: a JSON Schema
                    quoted in the system prompt); markers [[invalid-json]], [[schema-violation]].
    generation      otherwise: 40-120 tokens of sentence-cased text from the input's words,
                    and a last line "Confidence: 0.xx" when the system prompt asks the model
                    to rate its confidence. [[low-confidence]] makes that rating 0.30 and
                    every token's logprob low (p 0.15-0.45) in free text and JSON alike.
    [[refuse]]      the model refuses (as refusal_rate does).
    [[content-filter]]  OpenAI/Azure's content filter: finish_reason "content_filter" and empty
                    content (Anthropic: stop_reason "refusal").
    Tokens are counted as a byte-level BPE tokenizer would (`count_tokens`: a GPT-style
    pre-tokenizer, then per piece about one token per English word, one per 1-3 digits, a
    symbol pair, a CJK character; 2-3 per emoji; never more than the UTF-8 bytes), plus 4 per
    message for the chat template; max_tokens truncates (finish "length").
    Temperature is accepted and validated but does not change the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import hmac
import json
import math
import random
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import uvicorn

Scope = dict[str, Any]
AsgiMessage = dict[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

MODELS = ("sim-small", "sim-large", "gpt-4o-mini", "claude-3-5-haiku-latest")

DEFAULT_CONFIG: dict[str, Any] = {
    "latency_ms": 800,
    "latency_jitter_ms": 0,
    "stream_chunk_delay_ms": 20,
    "error_rate": 0.0,
    "error_status": 503,
    "rate_limit_rate": 0.0,
    "retry_after_s": 1,
    "timeout_rate": 0.0,
    "timeout_hang_s": 30,
    "outage": False,
    "overloaded_rate": 0.0,
    "refusal_rate": 0.0,
    "mid_stream_error_rate": 0.0,
    "quota_exhausted": False,
    "ratelimit_requests": 10_000,
    "ratelimit_tokens": 2_000_000,
    "ratelimit_enforce": False,
    "seed": 0,
    "script": [],
}
RATE_KEYS = frozenset(
    {
        "error_rate",
        "rate_limit_rate",
        "timeout_rate",
        "overloaded_rate",
        "refusal_rate",
        "mid_stream_error_rate",
    }
)
DURATION_KEYS = frozenset(
    {"latency_ms", "latency_jitter_ms", "stream_chunk_delay_ms", "retry_after_s", "timeout_hang_s"}
)
BOOL_KEYS = frozenset({"outage", "quota_exhausted", "ratelimit_enforce"})
LIMIT_KEYS = frozenset({"ratelimit_requests", "ratelimit_tokens"})
SCRIPT_ITEM_KEYS = frozenset({"status", "retry_after", "hang", "fault", "headers"})
# The real APIs' failure shapes (see the module docstring), by name.
FAULTS = ("quota", "overloaded", "refusal", "mid_stream_error")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")

TOKENS_PER_STREAM_CHUNK = 3
DEFAULT_MAX_TOKENS = 4096


# --------------------------------------------------------------------------- config validation


class ConfigError(ValueError):
    pass


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(updates: dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of `updates`; raise ConfigError naming the first bad key."""
    clean: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in DEFAULT_CONFIG:
            known = ", ".join(sorted(DEFAULT_CONFIG))
            raise ConfigError(f"unknown config key {key!r} (known keys: {known})")
        clean[key] = _validate_value(key, value)
    return clean


def _validate_value(key: str, value: Any) -> Any:
    if key in RATE_KEYS:
        if not _is_number(value) or not 0 <= value <= 1:
            raise ConfigError(f"{key} must be a number between 0 and 1, got {value!r}")
    elif key in DURATION_KEYS:
        if not _is_number(value) or value < 0:
            raise ConfigError(f"{key} must be a non-negative number, got {value!r}")
    elif key == "error_status":
        if not _is_int(value) or not 400 <= value <= 599:
            raise ConfigError(f"error_status must be an integer status 400..599, got {value!r}")
    elif key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif key in LIMIT_KEYS:
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    elif key == "seed":
        if not _is_int(value):
            raise ConfigError(f"seed must be an integer, got {value!r}")
    elif key == "script":
        if not isinstance(value, list):
            raise ConfigError(f"script must be a list, got {value!r}")
        return [_validate_script_item(i, item) for i, item in enumerate(value)]
    return value


def _validate_script_item(index: int, item: Any) -> int | dict[str, Any]:
    where = f"script[{index}]"
    if _is_int(item):
        if not 200 <= item <= 599:
            raise ConfigError(f"{where} must be a status 200..599, got {item!r}")
        return item
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a status or an object, got {item!r}")
    unknown = set(item) - SCRIPT_ITEM_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown key {sorted(unknown)[0]!r}")
    if "status" not in item and "hang" not in item and "fault" not in item:
        raise ConfigError(f"{where} needs 'status', 'hang' or 'fault'")
    if "fault" in item and item["fault"] not in FAULTS:
        raise ConfigError(
            f"{where}.fault must be one of {', '.join(FAULTS)}, got {item['fault']!r}"
        )
    headers = item.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.headers must be an object of strings, got {headers!r}")
    if "status" in item and (not _is_int(item["status"]) or not 200 <= item["status"] <= 599):
        raise ConfigError(f"{where}.status must be a status 200..599, got {item['status']!r}")
    for key in ("retry_after", "hang"):
        if key in item and (not _is_number(item[key]) or item[key] < 0):
            raise ConfigError(f"{where}.{key} must be a non-negative number, got {item[key]!r}")
    return dict(item)


# --------------------------------------------------------------------------- request parsing


class BadRequest(Exception):
    pass


@dataclass
class ChatRequest:
    """Either API's request, normalized: system prompts become leading "system" messages."""

    model: str
    messages: list[tuple[str, str]]
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: str = "text"
    schema: dict[str, Any] | None = None


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest(f"{where}: each content part must be an object")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest(f"{where}: text parts need a string 'text'")
                parts.append(text)
        return "\n".join(parts)
    raise BadRequest(f"{where} must be a string or a list of content parts")


def _parse_messages(raw: Any, roles: frozenset[str]) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' is required and must be a non-empty array")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = message.get("role")
        if role not in roles:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(sorted(roles))}")
        messages.append((role, _content_text(message.get("content"), f"messages[{i}].content")))
    return messages


def _parse_common(body: Any) -> tuple[str, bool]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    return model, stream


def _parse_max_tokens(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer")
    return value


def _parse_temperature(body: dict[str, Any], upper: float) -> None:
    value = body.get("temperature")
    if value is not None and (not _is_number(value) or not 0 <= value <= upper):
        raise BadRequest(f"'temperature' must be a number between 0 and {upper:g}")


def parse_openai(body: Any) -> ChatRequest:
    model, stream = _parse_common(body)
    roles = frozenset({"system", "developer", "user", "assistant", "tool"})
    request = ChatRequest(model=model, messages=_parse_messages(body.get("messages"), roles))
    request.stream = stream
    request.max_tokens = _parse_max_tokens(
        body.get("max_completion_tokens"), "max_completion_tokens"
    ) or _parse_max_tokens(body.get("max_tokens"), "max_tokens")
    _parse_temperature(body, 2.0)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object")
        request.include_usage = options.get("include_usage") is True
    logprobs = body.get("logprobs", False)
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be a boolean")
    request.logprobs = bool(logprobs)
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= 20:
            raise BadRequest("'top_logprobs' must be an integer between 0 and 20")
        if not request.logprobs:
            raise BadRequest("'logprobs' must be set to true when 'top_logprobs' is used")
        request.top_logprobs = top
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
            raise BadRequest(
                "'response_format.type' must be one of 'text', 'json_object', 'json_schema'"
            )
        request.response_format = fmt["type"]
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequest("'response_format.json_schema.schema' must be an object")
            request.schema = schema
    return request


_SCHEMA_HINT = re.compile(r"json\s+schema", re.IGNORECASE)


def _schema_in_prompt(text: str) -> dict[str, Any] | None:
    # aiqueue's Anthropic provider has no response_format, so it quotes the schema in the
    # system prompt ("... validates against this JSON Schema ...: {...}").
    match = _SCHEMA_HINT.search(text)
    start = text.find("{", match.end()) if match else -1
    if start < 0:
        return None
    try:
        schema, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return schema if isinstance(schema, dict) else None


def parse_anthropic(body: Any) -> ChatRequest:
    model, stream = _parse_common(body)
    messages = _parse_messages(body.get("messages"), frozenset({"user", "assistant"}))
    max_tokens = _parse_max_tokens(body.get("max_tokens"), "max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required")
    _parse_temperature(body, 1.0)
    system = _content_text(body.get("system"), "system")
    if system:
        messages.insert(0, ("system", system))
    request = ChatRequest(model=model, messages=messages, max_tokens=max_tokens, stream=stream)
    for _role, text in messages:
        schema = _schema_in_prompt(text)
        if schema is not None:
            request.response_format, request.schema = "json_schema", schema
            break
    return request


# --------------------------------------------------------------------------- answer generation


@dataclass
class Answer:
    text: str
    tokens: list[str]  # concatenates to text; the unit of logprobs and of stream chunks
    # "stop" | "length" | "refusal" (a model's refusal: OpenAI's message.refusal with content
    # null, Anthropic's stop_reason "refusal") | "content_filter" (OpenAI/Azure's filter: empty
    # content); each API maps it to its own vocabulary
    finish: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    refusal: str = ""


_MARKER_RE = re.compile(r"\[\[[a-z-]+\]\]", re.IGNORECASE)
_LABELS_RE = re.compile(r"^[ \t]*labels[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")
_PIECE_RE = re.compile(r"\s*\S{1,8}|\s+")
_STOPWORDS = frozenset(
    """about above after again against also answer because been before being below between
    both could does doing down during each from further have having here into itself
    just label labels more most much must only other over please respond return same should
    some such than that their theirs them then there these they this those through under
    until very were what when where which while whom will with would your yours following
    text input output summarize summarise classify extract describe write explain translate
    given provide""".split()
)
_FALLBACK_TOPICS = ("the workflow", "the schedule", "quality", "the budget", "feedback")
_OPENERS = ("", "", "Overall,", "In short,", "Notably,", "As a result,", "In practice,")
_SUBJECTS = (
    "the team",
    "this approach",
    "the proposal",
    "our analysis",
    "the system",
    "each step",
    "the review",
    "the summary",
    "the data",
)
_VERBS = (
    "highlights",
    "explains",
    "supports",
    "improves",
    "connects",
    "clarifies",
    "outlines",
    "examines",
    "addresses",
)
_OBJECTS = (
    "the key points",
    "several trade-offs",
    "a clear path forward",
    "the main risks",
    "recent changes",
    "the underlying goals",
    "practical next steps",
    "the open questions",
)
_LINKS = ("around", "regarding", "in light of", "together with", "with respect to", "alongside")
_ALTERNATIVE_TOKENS = (" the", " a", " and", " of", " to", ".", ",", " is")


def _digest(*parts: Any) -> int:
    # hashlib, not hash(): answers must survive restarts and PYTHONHASHSEED.
    raw = "\x1f".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def _unit(*parts: Any) -> float:
    return _digest(*parts) / 2**64


# A GPT-style pre-tokenizer: contractions, runs of letters (with one leading non-letter),
# numbers in groups of up to three digits, runs of other symbols, line breaks, spaces. BPE
# merges happen inside these pieces only.
_PRETOKEN_RE = re.compile(
    r"'(?:[sdmt]|ll|ve|re)|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _piece_tokens(piece: str) -> float:
    if piece.isascii():
        body = piece.strip()
        if not body:
            return math.ceil(len(piece) / 8)  # indentation and blank runs merge well
        if body.isalpha():
            return math.ceil(len(body) / 7)  # common words are one token, long ones split
        if body.isdigit():
            return 1  # the pre-tokenizer already cut numbers into 1-3 digits
        return math.ceil(len(body) / 2)  # symbols: common pairs like "()" or "==" merge
    tokens = 0.0
    for char in piece:
        size = len(char.encode("utf-8"))
        if size == 1:
            tokens += 0.2 if char.isalnum() else 0.5
        elif size == 2:
            tokens += 0.55  # accented Latin, Greek, Cyrillic: about two letters a token
        elif size == 3:
            # Kana merges more than Han characters; rare characters take two or three byte
            # tokens, which averages out above one a character.
            tokens += 0.85 if "\u3040" <= char <= "\u30ff" else 1.1
        else:
            tokens += 2.4  # emoji and other 4-byte characters split into byte tokens
    return tokens


def count_tokens(text: str) -> int:
    """Tokens as a byte-level BPE tokenizer (cl100k-like) would count them: about 0.6 of
    ceil(len/4) for English, more for code and numbers, 4x for CJK, 9x for emoji, and never
    more than the text's UTF-8 bytes (each token is at least one byte)."""
    total = 0
    for piece in _PRETOKEN_RE.findall(text):
        tokens = max(1, math.ceil(_piece_tokens(piece)))
        total += min(tokens, len(piece.encode("utf-8")))
    return total


def _truncate(text: str, limit: int) -> str:
    """The longest prefix of `text`, in whole pre-tokenizer pieces, within `limit` tokens."""
    kept, used = [], 0
    for piece in _PRETOKEN_RE.findall(text):
        cost = min(max(1, math.ceil(_piece_tokens(piece))), len(piece.encode("utf-8")))
        if used + cost > limit:
            break
        kept.append(piece)
        used += cost
    return "".join(kept)


def _pieces(text: str) -> list[str]:
    return _PIECE_RE.findall(text)


def _last_user_text(messages: list[tuple[str, str]]) -> str:
    for role, text in reversed(messages):
        if role == "user":
            return text
    return messages[-1][1]


def _labels(messages: list[tuple[str, str]]) -> list[str]:
    found: list[str] = []
    for _role, text in messages:
        for match in _LABELS_RE.finditer(text):
            found = [label.strip() for label in match.group(1).split(",")]
    return list(dict.fromkeys(label for label in found if label))


def _topics(messages: list[tuple[str, str]]) -> list[str]:
    words: dict[str, None] = {}
    for role, text in messages:
        if role != "user":
            continue
        text = _LABELS_RE.sub(" ", _MARKER_RE.sub(" ", text))
        for match in _WORD_RE.finditer(text):
            word = match.group().lower()
            if len(word) >= 4 and word not in _STOPWORDS:
                words.setdefault(word)
    return list(words) or list(_FALLBACK_TOPICS)


def _sentence(rng: random.Random, topics: list[str]) -> str:
    topic = rng.choice(topics)
    if len(topics) > 1 and rng.random() < 0.4:
        topic = " and ".join(rng.sample(topics, 2))
    words = " ".join(
        (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_LINKS))
    )
    opener = rng.choice(_OPENERS)
    sentence = f"{opener} {words} {topic}." if opener else f"{words} {topic}."
    return sentence[0].upper() + sentence[1:]


def _token_entry(
    token: str, logprob: float, alternatives: list[tuple[str, float]], top: int
) -> dict[str, Any]:
    ranked = sorted([(token, logprob), *alternatives], key=lambda item: -item[1])[:top]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": alt, "logprob": lp, "bytes": list(alt.encode())} for alt, lp in ranked
        ],
    }


class _SchemaFiller:
    """Builds an instance of a JSON Schema: every property filled, one item per array."""

    max_depth = 8

    def __init__(self, root: dict[str, Any], rng: random.Random, topics: list[str]) -> None:
        self.root = root
        self.rng = rng
        self.topics = topics

    def value(self, schema: Any, depth: int = 0) -> Any:
        if not isinstance(schema, dict):
            return self._string({})
        schema = self._resolve(schema, depth)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else ""
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _resolve(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        if depth > self.max_depth:
            return {"type": "null"}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target: Any = self.root
            for part in ref.lstrip("#").strip("/").split("/"):
                if part:
                    target = target.get(part.replace("~1", "/").replace("~0", "~"), {})
            return self._resolve(target if isinstance(target, dict) else {}, depth + 1)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                resolved = [self._resolve(o, depth + 1) for o in options if isinstance(o, dict)]
                usable = [o for o in resolved if o.get("type") != "null"] or resolved
                return self._resolve({**schema, key: None, **usable[0]}, depth + 1)
        parts = schema.get("allOf")
        if isinstance(parts, list) and parts:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                part = self._resolve(part, depth + 1) if isinstance(part, dict) else {}
                properties = {**merged.get("properties", {}), **part.get("properties", {})}
                required = [*merged.get("required", []), *part.get("required", [])]
                merged = {**part, **merged, "properties": properties, "required": required}
            return merged
        return schema

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        result = {name: self.value(sub, depth + 1) for name, sub in properties.items()}
        for name in schema.get("required") or []:
            result.setdefault(name, self._string({}))
        return result

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        items = schema.get("items", {})
        if isinstance(items, list):
            items = items[0] if items else {}
        count = max(1, schema.get("minItems", 0))
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        return [self.value(items, depth + 1) for _ in range(count)]

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        word = self.rng.choice(self.topics).replace(" ", "-")
        if fmt == "date":
            return f"2024-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}"
        if fmt == "date-time":
            return f"2024-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}T12:00:00Z"
        if fmt == "email":
            return f"{word}@example.com"
        if fmt in ("uri", "url"):
            return f"https://example.com/{word}"
        if fmt == "uuid":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        text = " ".join(self.rng.choice(self.topics) for _ in range(self.rng.randint(1, 3)))
        while len(text) < schema.get("minLength", 0):
            text += " " + self.rng.choice(self.topics)
        if "maxLength" in schema:
            text = text[: schema["maxLength"]]
        return text

    @staticmethod
    def _bounds(schema: dict[str, Any], step: float) -> tuple[float, float]:
        # Draft-04 spells exclusiveMinimum/Maximum as booleans: only numbers count here.
        low = 0
        if _is_number(schema.get("exclusiveMinimum")):
            low = schema["exclusiveMinimum"] + step
        if _is_number(schema.get("minimum")):
            low = max(low, schema["minimum"]) if "exclusiveMinimum" in schema else schema["minimum"]
        high = schema["maximum"] if _is_number(schema.get("maximum")) else low + 100
        if _is_number(schema.get("exclusiveMaximum")):
            high = min(high, schema["exclusiveMaximum"] - step)
        return low, max(low, high)

    def _integer(self, schema: dict[str, Any]) -> int:
        low, high = self._bounds(schema, 1)
        return self.rng.randint(math.ceil(low), max(math.ceil(low), math.floor(high)))

    def _number(self, schema: dict[str, Any]) -> float:
        low, high = self._bounds(schema, 0.01)
        return min(high, max(low, round(self.rng.uniform(low, high), 2)))


def generate_answer(request: ChatRequest, seed: int) -> Answer:
    messages = request.messages
    user_text = _last_user_text(messages)
    markers = {marker.lower() for marker in _MARKER_RE.findall(user_text)}
    # Each message costs its text and a few tokens of chat template (role, separators).
    prompt_tokens = max(1, sum(count_tokens(text) + 4 for _role, text in messages))
    conversation = json.dumps(messages)
    rng = random.Random(_digest(seed, request.model, conversation, "answer"))
    topics = _topics(messages)
    labels = _labels(messages)

    if "[[refuse]]" in markers:
        return refusal_answer(request, prompt_tokens)
    if "[[content-filter]]" in markers:
        return Answer("", [], "content_filter", prompt_tokens, 0, [] if request.logprobs else None)

    single_token: tuple[str, float, list[tuple[str, float]]] | None = None
    if request.response_format in ("json_object", "json_schema"):
        text = _json_answer(request, markers, rng, topics)
    elif labels:
        label = labels[_digest(seed, request.model, user_text) % len(labels)]
        if "[[low-confidence]]" in markers:
            probability = 0.35
        else:
            probability = round(0.80 + 0.19 * _unit(seed, request.model, user_text, "p"), 4)
        if "[[invalid-label]]" in markers:
            label = "unknown-label"
        others = [other for other in labels if other != label]
        share = (1 - probability) / len(others) if others else 0.0
        alternatives = [(other, math.log(share)) for other in others] if share > 0 else []
        text = label
        single_token = (label, math.log(probability), alternatives)
    else:
        target = 40 + _digest(seed, request.model, conversation, "length") % 81
        text = _sentence(rng, topics)
        while count_tokens(text) < target:
            text += " " + _sentence(rng, topics)
        if _asks_for_a_rating(messages):  # as models do: a last line when the prompt asks
            rating = 0.3 if "[[low-confidence]]" in markers else 0.8 + 0.17 * rng.random()
            text += f"\nConfidence: {rating:.2f}"

    finish = "stop"
    limit = request.max_tokens
    if limit is not None and count_tokens(text) > limit:
        text, finish, single_token = _truncate(text, limit), "length", None

    tokens = [single_token[0]] if single_token else _pieces(text)
    logprobs = None
    if request.logprobs:
        if single_token:
            token, logprob, alternatives = single_token
            logprobs = [_token_entry(token, logprob, alternatives, request.top_logprobs)]
        else:
            unsure = "[[low-confidence]]" in markers
            logprobs = [
                _generated_entry(token, rng, request.top_logprobs, unsure) for token in tokens
            ]
    return Answer(text, tokens, finish, prompt_tokens, count_tokens(text), logprobs)


def _asks_for_a_rating(messages: list[tuple[str, str]]) -> bool:
    """A system prompt asking the model to rate its confidence on a last line
    (jobs.kinds' self-rating)."""
    return any(
        role == "system" and "rate your confidence" in text.lower() for role, text in messages
    )


REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


def refusal_answer(request: ChatRequest, prompt_tokens: int) -> Answer:
    """The model declines: billed like any answer (its refusal text is output)."""
    tokens = _pieces(REFUSAL_TEXT)
    logprobs = [] if request.logprobs else None
    return Answer(
        "", tokens, "refusal", prompt_tokens, count_tokens(REFUSAL_TEXT), logprobs, REFUSAL_TEXT
    )


def _generated_entry(
    token: str, rng: random.Random, top: int, unsure: bool = False
) -> dict[str, Any]:
    # A token of a free-text or JSON answer; [[low-confidence]] makes the model unsure of each.
    probability = (0.15 + 0.3 * rng.random()) if unsure else (0.55 + 0.44 * rng.random())
    candidates = [alt for alt in _ALTERNATIVE_TOKENS if alt != token][: max(0, top - 1)]
    share = (1 - probability) / max(1, len(candidates))
    alternatives = [(alt, math.log(share)) for alt in candidates]
    return _token_entry(token, math.log(probability), alternatives, top)


def _json_answer(
    request: ChatRequest, markers: set[str], rng: random.Random, topics: list[str]
) -> str:
    if "[[invalid-json]]" in markers:
        return f'Sure! Here is the JSON you asked for:\n{{"summary": "{_sentence(rng, topics)}'
    violate = "[[schema-violation]]" in markers
    if request.schema is None:
        result: Any = {"summary": _sentence(rng, topics), "keywords": topics[:5]}
        if violate:
            del result["summary"]
        return json.dumps(result)
    try:
        result = _SchemaFiller(request.schema, rng, topics).value(request.schema)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        raise BadRequest(f"unsupported JSON schema: {exc!r}") from exc
    if isinstance(result, dict) and isinstance(result.get("confidence"), int | float):
        # A schema that asks for the model's own confidence gets one, low when marked.
        result["confidence"] = 0.3 if "[[low-confidence]]" in markers else 0.9
    if violate:
        required = request.schema.get("required") or []
        if isinstance(result, dict) and required:
            result = {k: v for k, v in result.items() if k not in required}
        else:
            result = [result]  # no required property to drop: break the root type instead
    return json.dumps(result)


# --------------------------------------------------------------------------- response shaping


def _openai_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


def _openai_finish(answer: Answer) -> str:
    # A refusal ends normally ("stop"); only the content filter has a finish reason of its own.
    return {"refusal": "stop"}.get(answer.finish, answer.finish)


def _openai_usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def openai_completion(request: ChatRequest, answer: Answer) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": "fp_simulator",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None if answer.refusal else answer.text,
                    "refusal": answer.refusal or None,
                },
                "logprobs": _openai_logprobs(answer.logprobs),
                "finish_reason": _openai_finish(answer),
            }
        ],
        "usage": _openai_usage(answer),
    }


def _chunks(answer: Answer) -> Iterator[tuple[str, list[dict[str, Any]] | None]]:
    for start in range(0, len(answer.tokens), TOKENS_PER_STREAM_CHUNK):
        end = start + TOKENS_PER_STREAM_CHUNK
        entries = answer.logprobs[start:end] if answer.logprobs is not None else None
        yield "".join(answer.tokens[start:end]), entries


def _sse(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n".encode()


# A stream is a list of (frame, pause_before): the pause is stream_chunk_delay_ms.
Frames = list[tuple[bytes, bool]]


def _break_point(answer: Answer) -> int:
    """How many content chunks a stream that breaks mid-way sends before its error."""
    return max(1, len(list(_chunks(answer))) // 2)


def streamed_tokens(answer: Answer, broken: bool) -> int:
    """The completion tokens a stream delivered (and a provider bills) before it broke."""
    if not broken:
        return answer.completion_tokens
    sent = list(_chunks(answer))[: _break_point(answer)]
    return count_tokens("".join(text for text, _entries in sent))


OPENAI_STREAM_ERROR = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
ANTHROPIC_STREAM_ERROR = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded"},
}


def openai_stream(request: ChatRequest, answer: Answer, broken: bool = False) -> Frames:
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": "fp_simulator",
    }
    if request.include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    frames: Frames = [(chunk({"role": "assistant", "content": "", "refusal": None}), False)]
    field = "refusal" if answer.refusal else "content"
    for i, (text, entries) in enumerate(_chunks(answer)):
        if broken and i == _break_point(answer):
            # The real API's mid-stream failure: an error object where a chunk should be,
            # then the stream ends (no finish reason, no usage, no [DONE]).
            frames.append((_sse(OPENAI_STREAM_ERROR), True))
            return frames
        frames.append((chunk({field: text}, _openai_logprobs(entries)), i > 0))
    frames.append((chunk({}, finish=_openai_finish(answer)), True))
    if request.include_usage:
        frames.append((_sse({**base, "choices": [], "usage": _openai_usage(answer)}), False))
    frames.append((_sse("[DONE]"), False))
    return frames


_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "refusal": "refusal",
    "content_filter": "refusal",
}


def anthropic_message(request: ChatRequest, answer: Answer) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [{"type": "text", "text": answer.text}] if answer.text else [],
        "stop_reason": _ANTHROPIC_STOP[answer.finish],
        "stop_sequence": None,
        "stop_details": (
            {"type": "refusal", "category": None, "explanation": answer.refusal or None}
            if _ANTHROPIC_STOP[answer.finish] == "refusal"
            else None
        ),
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens},
    }


def anthropic_stream(request: ChatRequest, answer: Answer, broken: bool = False) -> Frames:
    message = anthropic_message(request, answer)
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1},
    }
    frames: Frames = [
        (_sse({"type": "message_start", "message": start}, "message_start"), False),
        (_sse({"type": "ping"}, "ping"), False),
    ]
    if answer.text:
        block = {"type": "content_block_start", "index": 0}
        block["content_block"] = {"type": "text", "text": ""}
        frames.append((_sse(block, "content_block_start"), False))
        for i, (text, _entries) in enumerate(_chunks(answer)):
            if broken and i == _break_point(answer):
                # Anthropic's mid-stream failure: an `error` event, then the stream ends.
                frames.append((_sse(ANTHROPIC_STREAM_ERROR, "error"), True))
                return frames
            delta = {"type": "content_block_delta", "index": 0}
            delta["delta"] = {"type": "text_delta", "text": text}
            frames.append((_sse(delta, "content_block_delta"), i > 0))
        stop = {"type": "content_block_stop", "index": 0}
        frames.append((_sse(stop, "content_block_stop"), True))
    end = {
        "type": "message_delta",
        "delta": {
            "stop_reason": message["stop_reason"],
            "stop_sequence": None,
            "stop_details": message["stop_details"],
        },
        "usage": {"output_tokens": answer.completion_tokens},
    }
    frames.append((_sse(end, "message_delta"), False))
    frames.append((_sse({"type": "message_stop"}, "message_stop"), False))
    return frames


_OPENAI_MESSAGES = {
    400: "Simulated bad request.",
    401: "Incorrect API key provided.",
    500: "The server had an error while processing your request. (simulated)",
    503: "The server is overloaded or not ready yet. (simulated)",
    529: "Overloaded (simulated)",
    504: "Request timed out. (simulated)",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. (simulated)"
)
CREDIT_MESSAGE = (
    "Your credit balance is too low to access the API. Please go to Plans & Billing to "
    "upgrade or purchase credits. (simulated)"
)


def openai_error(status: int, message: str | None = None, fault: str = "") -> dict[str, Any]:
    if fault == "quota":
        # Billing, not rate: the same 429 as a rate limit, told apart by type and code.
        return {
            "error": {
                "message": QUOTA_MESSAGE,
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = "invalid_request_error", "invalid_api_key" if status == 401 else None
    text = message or _OPENAI_MESSAGES.get(status) or f"Simulated error {status}."
    return {"error": {"message": text, "type": kind, "param": None, "code": code}}


def anthropic_error(status: int, message: str | None = None, fault: str = "") -> dict[str, Any]:
    if fault == "quota":
        return {"type": "error", "error": {"type": "billing_error", "message": CREDIT_MESSAGE}}
    fallback = "api_error" if status >= 500 else "invalid_request_error"
    kind = _ANTHROPIC_TYPES.get(status, fallback)
    text = message or _OPENAI_MESSAGES.get(status) or f"Simulated error {status}."
    return {"type": "error", "error": {"type": kind, "message": text}}


@dataclass(frozen=True)
class Api:
    parse: Callable[[Any], ChatRequest]
    render: Callable[[ChatRequest, Answer], dict[str, Any]]
    stream: Callable[[ChatRequest, Answer, bool], Frames]
    error: Callable[..., dict[str, Any]]
    # The status each API answers a named fault with.
    fault_status: dict[str, int]
    ratelimit_headers: Callable[[RateWindow, float], list[tuple[bytes, bytes]]]


def _openai_duration(seconds: float) -> str:
    """OpenAI's reset format: "250ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes < 1:
        return f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{round(rest, 3):g}s"


def openai_ratelimit_headers(window: RateWindow, now: float) -> list[tuple[bytes, bytes]]:
    headers = []
    for name, (limit, remaining, reset) in window.state(now).items():
        headers += [
            (f"x-ratelimit-limit-{name}".encode(), str(limit).encode()),
            (f"x-ratelimit-remaining-{name}".encode(), str(remaining).encode()),
            (f"x-ratelimit-reset-{name}".encode(), _openai_duration(reset).encode()),
        ]
    return headers


def anthropic_ratelimit_headers(window: RateWindow, now: float) -> list[tuple[bytes, bytes]]:
    headers = []
    for name, (limit, remaining, reset) in window.state(now).items():
        moment = datetime.fromtimestamp(time.time() + reset, tz=UTC)
        headers += [
            (f"anthropic-ratelimit-{name}-limit".encode(), str(limit).encode()),
            (f"anthropic-ratelimit-{name}-remaining".encode(), str(remaining).encode()),
            (
                f"anthropic-ratelimit-{name}-reset".encode(),
                moment.isoformat(timespec="seconds").replace("+00:00", "Z").encode(),
            ),
        ]
    return headers


OPENAI = Api(
    parse_openai,
    openai_completion,
    openai_stream,
    openai_error,
    {"quota": 429, "overloaded": 503, "mid_stream_error": 500},
    openai_ratelimit_headers,
)
ANTHROPIC = Api(
    parse_anthropic,
    anthropic_message,
    anthropic_stream,
    anthropic_error,
    # Anthropic says "overloaded" with its own 529; credit is a billing_error.
    {"quota": 402, "overloaded": 529, "mid_stream_error": 500},
    anthropic_ratelimit_headers,
)


class RateWindow:
    """The simulated account's rate limits, as token buckets that refill over a minute: what
    the x-ratelimit-* (OpenAI) and anthropic-ratelimit-* headers report on every answer, and,
    with `ratelimit_enforce`, what answers 429 once a bucket is empty."""

    def __init__(self) -> None:
        self.used = {"requests": 0.0, "tokens": 0.0}
        self.limits = {"requests": 1, "tokens": 1}
        self.at = time.monotonic()

    def configure(self, requests: int, tokens: int) -> None:
        self.limits = {"requests": requests, "tokens": tokens}

    def _refill(self, now: float) -> None:
        elapsed, self.at = max(0.0, now - self.at), now
        for name, limit in self.limits.items():
            self.used[name] = max(0.0, self.used[name] - elapsed * limit / 60)

    def fits(self, tokens: int, now: float) -> str | None:
        """None if one more request of `tokens` fits, else the name of the empty bucket."""
        self._refill(now)
        if self.used["requests"] + 1 > self.limits["requests"]:
            return "requests"
        if self.used["tokens"] + tokens > self.limits["tokens"]:
            return "tokens"
        return None

    def charge(self, tokens: int, now: float) -> None:
        self._refill(now)
        self.used["requests"] += 1
        self.used["tokens"] += tokens

    def state(self, now: float) -> dict[str, tuple[int, int, float]]:
        """Per bucket: limit, remaining, seconds until it is full again."""
        self._refill(now)
        return {
            name: (
                limit,
                max(0, int(limit - self.used[name])),
                self.used[name] * 60 / limit,
            )
            for name, limit in self.limits.items()
        }


# --------------------------------------------------------------------------- fault decision


@dataclass(frozen=True)
class Outcome:
    status: int = 200
    delay_s: float = 0.0
    retry_after: float | None = None
    hung: bool = False
    fault: str = ""  # one of FAULTS, or "" for a plain answer or error
    headers: tuple[tuple[str, str], ...] = ()
    limited: str = ""  # the rate-limit bucket that is empty (ratelimit_enforce)

    @property
    def label(self) -> str:
        if self.fault:
            return {"refusal": "refused"}.get(self.fault, self.fault)
        if self.hung and self.status == 504:
            return "timeout"
        named = {200: "ok", 429: "rate_limited", 400: "bad_request", 401: "unauthorized"}
        return named.get(self.status, f"error_{self.status}")


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"


# --------------------------------------------------------------------------- ASGI plumbing


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _pause(seconds: float, gone: asyncio.Event) -> bool:
    """Sleep, but stop early (returning False) when the client disconnects."""
    if gone.is_set():
        return False
    if seconds <= 0:
        return True
    if seconds < 0.25:
        # Stream chunk pauses: a plain sleep is far cheaper than wait_for's extra task, and
        # noticing a disconnect one chunk late costs nothing.
        await asyncio.sleep(seconds)
        return not gone.is_set()
    try:
        await asyncio.wait_for(gone.wait(), timeout=seconds)
    except TimeoutError:
        return True
    return False


async def send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


# --------------------------------------------------------------------------- the app


def _fresh_counters() -> dict[str, Any]:
    return {
        "requests_total": 0,
        "by_outcome": {},
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "in_flight": 0,
        "peak_in_flight": 0,
        # Requests whose client went away before the answer was complete (cancelled calls).
        "disconnected": 0,
    }


class Simulator:
    """The ASGI app. All state lives on the event loop's thread, so counters are exact."""

    def __init__(self, *, api_key: str | None = None, **initial_config: Any) -> None:
        self.api_key = api_key or None
        self.defaults = {**copy.deepcopy(DEFAULT_CONFIG), **validate_config(initial_config)}
        self.config: dict[str, Any] = {}
        self.counters = _fresh_counters()
        self.rng = random.Random()
        self.window = RateWindow()
        self.reset()

    # ---- control

    def state(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config), "counters": copy.deepcopy(self.counters)}

    def reset_counters(self) -> None:
        # Requests still running will decrement in_flight later, so it survives a reset.
        in_flight = self.counters["in_flight"]
        self.counters = _fresh_counters()
        self.counters["in_flight"] = self.counters["peak_in_flight"] = in_flight

    def reset(self) -> None:
        self.config = copy.deepcopy(self.defaults)
        self.rng = random.Random(self.config["seed"])
        self.window = RateWindow()
        self.window.configure(self.config["ratelimit_requests"], self.config["ratelimit_tokens"])
        self.reset_counters()

    def update(self, changes: dict[str, Any]) -> None:
        changes = dict(changes)
        reset_counters = changes.pop("reset_counters", False)
        if not isinstance(reset_counters, bool):
            raise ConfigError(f"reset_counters must be true or false, got {reset_counters!r}")
        self.config.update(validate_config(changes))
        if "seed" in changes:
            self.rng = random.Random(self.config["seed"])
        self.window.configure(self.config["ratelimit_requests"], self.config["ratelimit_tokens"])
        if reset_counters:
            self.reset_counters()

    # ---- fault decision

    def _latency_s(self) -> float:
        mean, jitter = self.config["latency_ms"], self.config["latency_jitter_ms"]
        if jitter:
            mean += self.rng.uniform(-jitter, jitter)
        return max(0.0, mean) / 1000

    def decide(self, api: Api, request: ChatRequest, answer: Answer) -> Outcome:
        config = self.config
        now = time.monotonic()
        if config["script"]:
            return self._scripted(config["script"].pop(0), api, request)
        if config["quota_exhausted"]:
            return Outcome(api.fault_status["quota"], fault="quota")
        tokens = answer.prompt_tokens + (request.max_tokens or answer.completion_tokens)
        if config["ratelimit_enforce"]:
            empty = self.window.fits(tokens, now)
            if empty is not None:
                # No Retry-After: the client has only the rate-limit headers to go by.
                return Outcome(429, limited=empty)
        self.window.charge(tokens, now)
        if config["outage"]:
            return Outcome(config["error_status"], self._latency_s())
        draw = self.rng.random()
        threshold = config["rate_limit_rate"]
        if draw < threshold:
            return Outcome(429, retry_after=config["retry_after_s"])
        threshold += config["timeout_rate"]
        if draw < threshold:
            return Outcome(504, config["timeout_hang_s"], hung=True)
        threshold += config["error_rate"]
        if draw < threshold:
            return Outcome(config["error_status"], self._latency_s())
        threshold += config["overloaded_rate"]
        if draw < threshold:
            return Outcome(api.fault_status["overloaded"], self._latency_s(), fault="overloaded")
        threshold += config["refusal_rate"]
        if draw < threshold:
            return Outcome(200, self._latency_s(), fault="refusal")
        threshold += config["mid_stream_error_rate"]
        if draw < threshold and request.stream:
            return Outcome(200, self._latency_s(), fault="mid_stream_error")
        return Outcome(200, self._latency_s())

    def _scripted(self, item: int | dict[str, Any], api: Api, request: ChatRequest) -> Outcome:
        if isinstance(item, int):
            item = {"status": item}
        retry_after = item.get("retry_after")
        headers = tuple(item.get("headers", {}).items())
        fault = item.get("fault", "")
        if "hang" in item:
            return Outcome(item.get("status", 504), item["hang"], retry_after, True, fault, headers)
        if fault in ("quota", "overloaded"):
            status = item.get("status", api.fault_status[fault])
        elif fault == "mid_stream_error" and not request.stream:
            status = api.fault_status[fault]  # nothing to break mid-way: a plain 500
        else:
            status = item.get("status", 200)
        delay = 0.0 if status == 429 or fault == "quota" else self._latency_s()
        return Outcome(status, delay, retry_after, False, fault, headers)

    def _record(
        self, label: str, answer: Answer | None = None, completion_tokens: int | None = None
    ) -> None:
        """Count an outcome; with `answer`, the tokens it is billed (a refusal's too, and
        what a stream that broke had sent)."""
        by_outcome = self.counters["by_outcome"]
        by_outcome[label] = by_outcome.get(label, 0) + 1
        if answer is not None:
            self.counters["prompt_tokens"] += answer.prompt_tokens
            self.counters["completion_tokens"] += (
                answer.completion_tokens if completion_tokens is None else completion_tokens
            )

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None:
            return True
        bearer = _header(scope, b"authorization")
        candidates = [_header(scope, b"x-api-key")]
        if bearer[:7].lower() == "bearer ":
            candidates.append(bearer[7:].strip())
        return any(hmac.compare_digest(c.encode(), self.api_key.encode()) for c in candidates)

    # ---- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._route(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if method == "POST" and path == "/v1/chat/completions":
            await self._completion(OPENAI, scope, receive, send)
        elif method == "POST" and path == "/v1/messages":
            await self._completion(ANTHROPIC, scope, receive, send)
        elif method == "GET" and path == "/v1/models":
            if not self._authorized(scope):
                await send_json(send, 401, openai_error(401))
                return
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "aiqueue-simulator"}
                for m in MODELS
            ]
            await send_json(send, 200, {"object": "list", "data": data})
        elif method == "GET" and path == "/_control":
            await send_json(send, 200, self.state())
        elif method == "PUT" and path == "/_control":
            await self._put_control(receive, send)
        elif method == "POST" and path == "/_control/reset":
            self.reset()
            await send_json(send, 200, self.state())
        else:
            await send_json(send, 404, openai_error(404, f"Unknown route: {method} {path}"))

    async def _put_control(self, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            changes = json.loads(body or b"{}")
            if not isinstance(changes, dict):
                raise ConfigError("the body must be a JSON object")
            self.update(changes)
        except ValueError as exc:  # JSONDecodeError and ConfigError both are ValueErrors
            await send_json(send, 400, openai_error(400, str(exc)))
            return
        await send_json(send, 200, self.state())

    async def _completion(self, api: Api, scope: Scope, receive: Receive, send: Send) -> None:
        counters = self.counters
        counters["requests_total"] += 1
        counters["in_flight"] += 1
        counters["peak_in_flight"] = max(counters["peak_in_flight"], counters["in_flight"])
        try:
            await self._answer(api, scope, receive, send)
        finally:
            # reset_counters() may have swapped the dict meanwhile: decrement the live one.
            self.counters["in_flight"] -= 1

    async def _answer(self, api: Api, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        if not self._authorized(scope):
            self._record("unauthorized")
            await send_json(send, 401, api.error(401, None))
            return
        try:
            payload = json.loads(body)
        except ValueError:
            self._record("bad_request")
            await send_json(send, 400, api.error(400, "The request body is not valid JSON."))
            return
        try:
            request = api.parse(payload)
            answer = generate_answer(request, self.config["seed"])
        except BadRequest as exc:
            self._record("bad_request")
            await send_json(send, 400, api.error(400, str(exc)))
            return

        outcome = self.decide(api, request, answer)
        if outcome.fault == "refusal" and answer.finish != "refusal":
            answer = refusal_answer(request, answer.prompt_tokens)
        broken = outcome.fault == "mid_stream_error" and outcome.status == 200
        if outcome.status != 200:
            self._record(outcome.label)
        elif broken:
            self._record(outcome.label, answer, streamed_tokens(answer, broken=True))
        else:
            self._record("refused" if answer.finish == "refusal" else "ok", answer)

        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            if not await _pause(outcome.delay_s, gone):
                self.counters["disconnected"] += 1
                return
            headers = [(b"x-request-id", f"req_{uuid.uuid4().hex}".encode())]
            limits = dict(api.ratelimit_headers(self.window, time.monotonic()))
            if outcome.status != 200:
                retry_after = outcome.retry_after
                if (
                    outcome.status == 429
                    and retry_after is None
                    and not (outcome.limited or outcome.fault or outcome.headers)
                ):
                    retry_after = self.config["retry_after_s"]
                if retry_after is not None:
                    seconds = _format_seconds(retry_after)
                    headers.append((b"retry-after", seconds.encode()))
                    if api is OPENAI:
                        limits[b"x-ratelimit-remaining-requests"] = b"0"
                        limits[b"x-ratelimit-reset-requests"] = f"{seconds}s".encode()
            for name, value in outcome.headers:
                limits[name.lower().encode()] = value.encode()
            headers += list(limits.items())
            if outcome.status != 200:
                error = api.error(outcome.status, None, outcome.fault)
                await send_json(send, outcome.status, error, headers)
            elif request.stream:
                frames = api.stream(request, answer, broken)
                if not await self._stream(frames, send, headers, gone):
                    self.counters["disconnected"] += 1
            else:
                await send_json(send, 200, api.render(request, answer), headers)
        finally:
            watcher.cancel()

    async def _stream(
        self, frames: Frames, send: Send, headers: list[tuple[bytes, bytes]], gone: asyncio.Event
    ) -> bool:
        """Send the frames; False if the client went away first."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    *headers,
                ],
            }
        )
        for frame, pause in frames:
            delay = self.config["stream_chunk_delay_ms"] / 1000 if pause else 0.0
            if not await _pause(delay, gone):
                return False
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


def create_app(*, api_key: str | None = None, **initial_config: Any) -> Simulator:
    """The ASGI app; `initial_config` overrides DEFAULT_CONFIG and is what reset returns to."""
    return Simulator(api_key=api_key, **initial_config)


# --------------------------------------------------------------------------- command line


def _raise_fd_limit() -> None:
    # 1,000+ concurrent connections need more descriptors than the usual 1,024 soft limit.
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


async def _announce(server: uvicorn.Server, host: str) -> None:
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"simulator listening on http://{host}:{port}", flush=True)


async def _serve(server: uvicorn.Server, host: str) -> int:
    announcer = asyncio.create_task(_announce(server, host))
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits on start-up failure (port taken), logged already
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        announcer.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="Simulated OpenAI/Anthropic-compatible AI provider (see the module docstring)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=800.0)
    parser.add_argument("--api-key", default=None, help="require this key on /v1 endpoints")
    args = parser.parse_args(argv)
    try:
        latency = int(args.latency_ms) if args.latency_ms.is_integer() else args.latency_ms
        app = create_app(api_key=args.api_key, seed=args.seed, latency_ms=latency)
    except ConfigError as exc:
        parser.error(str(exc))

    _raise_fd_limit()
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # Hanging requests (timeout_hang_s) must not hold a shutdown for half a minute.
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)

    def request_exit(_signum: int, _frame: Any) -> None:
        server.should_exit = True

    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place that re-raise is a no-op and the process exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_exit)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        return runner.run(_serve(server, args.host))


if __name__ == "__main__":
    sys.exit(main())
