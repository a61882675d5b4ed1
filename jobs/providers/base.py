"""The provider seam: one small base class, one module per kind, one place for outbound HTTP.

A provider turns a CompletionRequest into a Completion, or raises ProviderError with
`retryable` set by one shared taxonomy. Tests that need a failure the simulator cannot
produce mock here and nowhere else.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from jobs.models import Provider

# Statuses worth another try: throttling, request timeout, and the server's own failures.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


class ProviderError(Exception):
    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        error_class: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.error_class = error_class or (f"http_{status}" if status else "provider_error")

    @classmethod
    def from_response(cls, response: httpx.Response, message: str) -> ProviderError:
        status = response.status_code
        return cls(
            f"{status}: {message}"[:500],
            retryable=status in RETRYABLE_STATUSES or status >= 500,
            status=status,
            retry_after=parse_retry_after(response.headers),
        )


class ProviderConfigError(ProviderError):
    """The provider row cannot be used as configured (for instance its key is missing)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, error_class="configuration")


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from Retry-After or the OpenAI/Anthropic rate-limit reset headers."""
    raw = headers.get("retry-after-ms")
    if raw:
        try:
            return max(0.0, float(raw) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass  # HTTP-date form: rare for AI APIs; fall through to the reset headers
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        raw = headers.get(name)
        if raw:
            seconds = _parse_duration(raw)
            if seconds is not None:
                return seconds
    return None


def _parse_duration(raw: str) -> float | None:
    # OpenAI sends durations like "1s", "6m0s", "250ms".
    total, number = 0.0, ""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if raw.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        total += float(number)
    return total


@dataclass
class CompletionRequest:
    model: str
    user_prompt: str
    system_prompt: str = ""
    max_output_tokens: int = 512
    temperature: float = 0.0
    labels: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    stream: bool = False


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str = ""
    confidence: float | None = None
    status: int = 200


DeltaCallback = Callable[[str], None]


class BaseProvider:
    """One configured provider. Subclasses implement `complete`."""

    default_base_url = ""

    def __init__(
        self, provider: Provider, client: httpx.Client, *, read_timeout: float | None = None
    ) -> None:
        self.provider = provider
        self.client = client
        # The runner clamps the read timeout below what is left of the job's run time; the
        # same figure bounds a whole streamed answer (httpx's read timeout is per chunk).
        self.read_timeout = read_timeout or provider.read_timeout_s

    def timeout(self) -> httpx.Timeout:
        connect = self.provider.connect_timeout_s
        return httpx.Timeout(connect=connect, read=self.read_timeout, write=connect, pool=connect)

    @property
    def base_url(self) -> str:
        return (self.provider.base_url or self.default_base_url).rstrip("/")

    def api_key(self) -> str:
        name = self.provider.api_key_env
        if not name:
            return ""
        value = os.environ.get(name, "")
        if not value:
            raise ProviderConfigError(
                f"API key missing: environment variable {name} is not set for provider "
                f"{self.provider.name!r}"
            )
        return value

    def complete(
        self, request: CompletionRequest, on_delta: DeltaCallback | None = None
    ) -> Completion:
        raise NotImplementedError

    def post(self, path: str, *, json: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        try:
            response = self.client.post(
                self.base_url + path, json=json, headers=headers, timeout=self.timeout()
            )
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"timeout: {type(exc).__name__}", retryable=True, error_class="timeout"
            )
        except httpx.TransportError as exc:
            raise ProviderError(
                f"connection error: {exc}", retryable=True, error_class="connection"
            )
        return response

    def stream_lines(self, path: str, *, json: dict[str, Any], headers: dict[str, str]):
        """Yield the `data:` payloads of a server-sent-event response."""
        try:
            deadline = time.monotonic() + self.read_timeout
            with self.client.stream(
                "POST", self.base_url + path, json=json, headers=headers, timeout=self.timeout()
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ProviderError.from_response(response, error_message(response))
                event = ""
                for line in response.iter_lines():
                    if time.monotonic() > deadline:
                        raise ProviderError(
                            f"timeout: the stream took longer than {self.read_timeout:g} s",
                            retryable=True,
                            error_class="timeout",
                        )
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        yield event, line[5:].strip()
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"timeout: {type(exc).__name__}", retryable=True, error_class="timeout"
            )
        except httpx.TransportError as exc:
            raise ProviderError(
                f"connection error: {exc}", retryable=True, error_class="connection"
            )


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)[:300]
    return str(body)[:300]


def label_confidence(logprob: float | None) -> float | None:
    return None if logprob is None else round(math.exp(logprob), 6)


def structured_confidence(text: str) -> float | None:
    """The model's own confidence from a structured answer: a JSON object's top-level
    "confidence" in [0, 1] (or a percentage in (1, 100]). None when there is none."""
    body = text.strip()
    if not body.startswith("{"):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    value = data.get("confidence") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if 1 < value <= 100:
        value = value / 100
    return float(value) if 0 <= value <= 1 else None


# A few pooled clients per provider per process, handed out round-robin to the threads of a
# worker. One httpx pool shared by many threads serialises them on its lock: with 100 threads
# at 250 ms latency one client reached 30% of the ideal rate, four 74% (bench/httpclients.py,
# docs/benchmarks.md; encode/httpx#3215). Rebuilt when the provider row changes (timeouts
# edited in the admin).
_clients: dict[tuple[int, float], tuple[list[httpx.Client], itertools.count]] = {}
_clients_lock = threading.Lock()


def client_for(provider: Provider) -> httpx.Client:
    from django.conf import settings

    key = (provider.pk, provider.updated_at.timestamp() if provider.updated_at else 0.0)
    with _clients_lock:
        entry = _clients.get(key)
        if entry is None:
            for old_key in [k for k in _clients if k[0] == provider.pk]:
                for old in _clients.pop(old_key)[0]:
                    old.close()
            timeout = httpx.Timeout(
                connect=provider.connect_timeout_s,
                read=provider.read_timeout_s,
                write=provider.connect_timeout_s,
                pool=provider.connect_timeout_s,
            )
            # retries=0 said out loud: the one retry layer is jobs.retries (retries stacked
            # in several layers multiply).
            clients = [
                httpx.Client(
                    timeout=timeout,
                    transport=httpx.HTTPTransport(
                        retries=0,
                        limits=httpx.Limits(max_connections=50, max_keepalive_connections=50),
                    ),
                )
                for _ in range(settings.AIQUEUE_HTTP_CLIENTS)
            ]
            entry = _clients[key] = (clients, itertools.count())
        clients, turns = entry
        return clients[next(turns) % len(clients)]
