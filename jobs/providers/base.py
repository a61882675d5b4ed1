"""The provider seam: one small base class, one module per kind, one place for outbound HTTP.

A provider turns a CompletionRequest into a Completion, or raises ProviderError with
`retryable` set by one shared taxonomy. Tests that need a failure the simulator cannot
produce mock here and nowhere else.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from jobs import provider_keys
from jobs.inputs import scrub
from jobs.providers import loop

if TYPE_CHECKING:
    from jobs.models import Provider

# The Anthropic provider quotes a response schema in the system prompt after this sentence;
# jobs.costs counts it for every call that is sent a schema.
SCHEMA_INSTRUCTION = (
    "\n\nAnswer with one JSON object that validates against this JSON Schema, and nothing else:\n"
)

# Statuses worth another try: throttling, request timeout, and the server's own failures.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


class ProviderError(Exception):
    """A call that did not give a usable answer.

    `retryable`: another try may succeed. `billed`: the provider charges for this call. An
    error answer (any 4xx/5xx, 429 and 529 included) and a connection refused or reset before
    the request was sent cost nothing; a call the provider accepted and then lost (read
    timeout, a stream cut or broken mid-way, a malformed 200) may have been generated and is
    billed. When in doubt, billed: the ledger must never be below what the provider charged.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        error_class: str = "",
        billed: bool = True,
        usage: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.error_class = error_class or (f"http_{status}" if status else "provider_error")
        self.billed = billed
        # (tokens in, tokens out) the provider reported for a billed failure (a refusal is an
        # answer, and paid): the ledger records them as it would a completion's.
        self.usage = usage

    @classmethod
    def from_response(cls, response: httpx.Response, message: str) -> ProviderError:
        """The error an answer with status >= 400 stands for: out of credit (not retried,
        the provider waits for an operator), overloaded, throttled, or the status's own."""
        status = response.status_code
        kind, code, text = error_fields(response)
        if is_out_of_credit(status, kind, code, text):
            return OutOfCredit(f"{status}: {message}"[:500], status=status)
        overloaded = status == 529 or kind == "overloaded_error"
        return cls(
            f"{status}: {message}"[:500],
            retryable=overloaded or status in RETRYABLE_STATUSES or status >= 500,
            status=status,
            retry_after=parse_retry_after(response.headers),
            error_class="overloaded" if overloaded else "",
            billed=False,  # an error answer is not billed
        )


class OutOfCredit(ProviderError):
    """The provider's account has no credit left (OpenAI's 429 `insufficient_quota`,
    Anthropic's `billing_error`): every call fails until someone pays, so retrying only burns
    attempts and feeds the breaker. Not retried and not billed; the provider is marked out of
    credit and its jobs are held until an operator clears it (jobs.credit)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(
            message, retryable=False, status=status, error_class="out_of_credit", billed=False
        )


class ProviderConfigError(ProviderError):
    """The provider row cannot be used as configured (for instance its key is missing)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, error_class="configuration", billed=False)


def transport_error(exc: httpx.HTTPError, *, answered: bool = False) -> ProviderError:
    """A call that got no answer, or lost the rest of one. Before the provider began to
    answer, a refused or reset connection, a timeout connecting, waiting for the pool or
    sending, or the server hanging up without a status line cost nothing: the request never
    got to a model, or the provider failed it itself. A read timeout is billed (the provider
    took the request and may be generating it), and so is anything after the answer began
    (`answered`: a body or stream cut mid-way)."""
    if isinstance(exc, httpx.TimeoutException):
        before_sending = isinstance(
            exc, httpx.ConnectTimeout | httpx.PoolTimeout | httpx.WriteTimeout
        )
        return ProviderError(
            f"timeout: {type(exc).__name__}",
            retryable=True,
            error_class="timeout",
            billed=answered or not before_sending,
        )
    return ProviderError(
        f"connection error: {exc}",
        retryable=True,
        error_class="connection",
        billed=answered,
    )


def error_fields(response: httpx.Response) -> tuple[str, str, str]:
    """(type, code, message) of an error body: OpenAI's {"error": {"type", "code",
    "message"}} or Anthropic's {"type": "error", "error": {"type", "message"}}."""
    try:
        body = response.json()
    except ValueError:
        return "", "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", ""
    return (
        str(error.get("type") or ""),
        str(error.get("code") or ""),
        str(error.get("message") or ""),
    )


def is_out_of_credit(status: int, kind: str, code: str, message: str) -> bool:
    """A billing failure, not a rate limit: OpenAI answers 429 with type or code
    `insufficient_quota` (the same status as a rate limit); Anthropic answers `billing_error`
    (402), and older API versions a 400 `invalid_request_error` whose only tell is its text
    ("Your credit balance is too low ...")."""
    if "insufficient_quota" in (kind, code) or kind == "billing_error" or status == 402:
        return True
    return status == 400 and kind == "invalid_request_error" and "credit balance" in message


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from Retry-After or else the rate-limit headers.

    Without Retry-After, the wait is for the limit that is used up: OpenAI reports requests
    and tokens separately (`x-ratelimit-remaining-*` and `x-ratelimit-reset-*`, durations
    like "6m0s"), so a 429 with 4999 requests left resetting in 6 minutes and no tokens left
    resetting in 1.5 s waits 1.5 s. Anthropic reports `anthropic-ratelimit-*-remaining` and
    `-reset` (RFC 3339 times). With no remaining counts, the soonest reset."""
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
    resets: dict[str, tuple[float, int | None]] = {}
    for name in ("requests", "tokens"):
        seconds = _parse_duration(headers.get(f"x-ratelimit-reset-{name}", ""))
        if seconds is not None:
            resets[name] = (seconds, _int_or_none(headers.get(f"x-ratelimit-remaining-{name}")))
    for name in ("requests", "tokens", "input-tokens", "output-tokens"):
        seconds = _seconds_until(headers.get(f"anthropic-ratelimit-{name}-reset", ""))
        if seconds is not None:
            remaining = _int_or_none(headers.get(f"anthropic-ratelimit-{name}-remaining"))
            resets[f"anthropic-{name}"] = (seconds, remaining)
    if not resets:
        return None
    exhausted = [seconds for seconds, remaining in resets.values() if remaining == 0]
    if exhausted:
        return max(exhausted)  # every used-up limit must have reset before a call fits
    return min(seconds for seconds, _remaining in resets.values())


def _int_or_none(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _seconds_until(raw: str) -> float | None:
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _parse_duration(raw: str) -> float | None:
    # OpenAI sends durations like "1s", "6m0s", "250ms".
    if not raw:
        return None
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
    # None: not sent, the model's default applies (newer models reject the parameter).
    temperature: float | None = None
    labels: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    stream: bool = False
    # Ask for the answer's token logprobs (its confidence: jobs.kinds.confidence_from); a label
    # request always asks, for its first token's.
    logprobs: bool = False


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str = ""
    confidence: float | None = None
    status: int = 200

    def __post_init__(self) -> None:
        # Model output is untrusted text, and a JSON answer can carry a lone surrogate
        # ("\ud800") or a NUL that no database column (PostgreSQL) or page can hold: each
        # becomes U+FFFD here, once, for every provider.
        self.text = scrub(self.text).replace("\x00", "\ufffd")


DeltaCallback = Callable[[str], None]


class CallAborted(Exception):
    """The call was cut off on purpose (its job was cancelled, or passed its deadline), from
    another thread: `CallHandle.abort`. Not a ProviderError: nothing is wrong with the
    provider, and nothing retries it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The call the current thread (or run on the call loop: jobs.providers.loop) is making.
_calling: contextvars.ContextVar[CallHandle | None] = contextvars.ContextVar(
    "provider_call", default=None
)


class CallHandle:
    """One provider call in flight: the usage the provider has reported so far (a streamed
    answer reports input at its start, output at its end), and a way to cut the call off from
    another thread, streamed or not.

    `abort()` shuts down the sockets the call is reading and writing (the thread blocked in a
    read wakes at once with an error, whatever the read timeout), so a cancelled job stops
    costing money within a heartbeat instead of running to the end of its answer. The sockets
    are found through `AbortableBackend`, which every pooled client uses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[Any] = []
        self.abort_reason: str | None = None
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None

    def report(self, tokens_in: int | None, tokens_out: int | None) -> None:
        if tokens_in is not None:
            self.tokens_in = tokens_in
        if tokens_out is not None:
            self.tokens_out = tokens_out

    def abort(self, reason: str) -> None:
        with self._lock:
            if self.abort_reason is not None:
                return
            self.abort_reason = reason
            streams = list(self._streams)
        for stream in streams:
            _shut(stream)

    def attach(self, stream: Any) -> None:
        with self._lock:
            if not any(known is stream for known in self._streams):
                self._streams.append(stream)
            aborted = self.abort_reason is not None
        if aborted:
            _shut(stream)

    def __enter__(self) -> CallHandle:
        if self.abort_reason is not None:
            raise CallAborted(self.abort_reason)
        _calling.set(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _calling.set(None)
        with self._lock:
            self._streams.clear()


def _shut(stream: Any) -> None:
    sock = stream.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class _AbortableStream(httpcore.NetworkStream):
    """A connection's stream that tells the call using it (the thread's CallHandle) which
    socket to shut down if it is aborted."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def _seen(self) -> None:
        handle = _calling.get()
        if handle is not None:
            handle.attach(self)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._seen()
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._seen()
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _AbortableStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class AbortableBackend(httpcore.NetworkBackend):
    """httpcore's network backend, wrapped so that each stream reports itself to the call
    using it (see CallHandle). Installed on the pooled clients' transports by `client_for`
    (`HTTPTransport._pool._network_backend`: httpx has no public hook for it;
    tests/providers/test_providers.py fails loudly if an upgrade moves it)."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _AbortableStream(
            self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _AbortableStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


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
        # One provider object per call (registry.get_provider): its handle is that call's.
        self.call = CallHandle()

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
        if problem := provider_keys.refusal(name):  # issue 18: never another variable
            raise ProviderConfigError(
                f"API key refused for provider {self.provider.name!r}: {problem}"
            )
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
        request = self.client.build_request(
            "POST", self.base_url + path, json=json, headers=headers, timeout=self.timeout()
        )
        with self.call:
            try:
                response = self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise self._lost(exc, answered=False) from exc
            # The answer has begun: losing the rest of it is billed (transport_error).
            try:
                response.read()
            except httpx.TransportError as exc:
                raise self._lost(exc, answered=True) from exc
            finally:
                response.close()
        return response

    def stream_lines(self, path: str, *, json: dict[str, Any], headers: dict[str, str]):
        """Yield the `data:` payloads of a server-sent-event response."""
        answered = False
        try:
            deadline = time.monotonic() + self.read_timeout
            with (
                self.call,
                self.client.stream(
                    "POST", self.base_url + path, json=json, headers=headers, timeout=self.timeout()
                ) as response,
            ):
                answered = True
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
        except httpx.TransportError as exc:
            raise self._lost(exc, answered=answered) from exc

    def _lost(self, exc: httpx.TransportError, *, answered: bool) -> Exception:
        """What a transport error means: this run cut its own call off (`CallHandle.abort`,
        the sockets shut under the read), or the call was lost (`transport_error`)."""
        if self.call.abort_reason is not None:
            return CallAborted(self.call.abort_reason)
        return transport_error(exc, answered=answered)


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)[:300]
    return str(body)[:300]


def stream_error(error: Any, *, usage: tuple[int, int] | None = None) -> ProviderError:
    """An error sent inside a stream that had started (OpenAI's `data: {"error": ...}` chunk,
    Anthropic's `event: error`): the request was accepted and generation began, so it is
    billed; the provider's own trouble (server, overloaded, API errors) is worth another
    try, anything else is not."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    kind = str(error.get("type") or "")
    retryable = kind in {"server_error", "api_error", "overloaded_error", ""}
    return ProviderError(
        f"stream error: {error.get('message') or kind or 'the provider broke off the answer'}"[
            :500
        ],
        retryable=retryable,
        error_class="stream_error",
        billed=True,
        usage=usage,
    )


def refusal_error(reason: str, *, status: int, usage: tuple[int, int]) -> ProviderError:
    """The model declined. Not retried (it would decline again), and billed: the refusal is
    an answer, and its usage goes to the ledger."""
    return ProviderError(
        f"the model refused: {reason}"[:500],
        retryable=False,
        status=status,
        error_class="refusal",
        billed=True,
        usage=usage,
    )


def label_confidence(logprob: float | None) -> float | None:
    return None if logprob is None else round(math.exp(logprob), 6)


def mean_token_confidence(logprob_sum: float, tokens: int) -> float | None:
    """An answer's confidence from its tokens' logprobs: the geometric mean of their
    probabilities (exp of the mean logprob), so a long answer is not judged by its length."""
    return round(math.exp(logprob_sum / tokens), 6) if tokens else None


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


def abortable_transport(*, on_loop: bool = False) -> httpx.HTTPTransport:
    """A pooled transport whose calls a CallHandle can cut off. retries=0 said out loud: the
    one retry layer is runs.retries (retries stacked in several layers multiply).

    `on_loop`: the transport of the runs on the call loop (jobs.providers.loop), whose sockets
    park the run instead of blocking. Its pool has no connection limit: a run waiting for a
    free connection would wait on a lock and hold up every run on the loop; how many calls a
    process makes at once is the worker's concurrency."""
    limits = (
        httpx.Limits(max_connections=None, max_keepalive_connections=100)
        if on_loop
        else httpx.Limits(max_connections=50, max_keepalive_connections=50)
    )
    transport = httpx.HTTPTransport(retries=0, limits=limits)
    pool = transport._pool
    inner = loop.GreenBackend() if on_loop else pool._network_backend
    pool._network_backend = AbortableBackend(inner)
    return transport


# A few pooled clients per provider per process, handed out round-robin to the threads of a
# worker. One httpx pool shared by many threads serialises them on its lock: with 100 threads
# at 250 ms latency one client reached 30% of the ideal rate, four 74% (bench/httpclients.py,
# docs/benchmarks.md; encode/httpx#3215). Rebuilt when the provider row changes (timeouts
# edited in the admin).
_clients: dict[tuple[int, float, bool], tuple[list[httpx.Client], itertools.count]] = {}
_clients_lock = threading.Lock()


def client_for(provider: Provider) -> httpx.Client:
    from django.conf import settings

    on_loop = loop.current() is not None
    key = (provider.pk, provider.updated_at.timestamp() if provider.updated_at else 0.0, on_loop)
    with _clients_lock:
        entry = _clients.get(key)
        if entry is None:
            for old_key in [k for k in _clients if k[0] == provider.pk and k[2] == on_loop]:
                for old in _clients.pop(old_key)[0]:
                    old.close()
            timeout = httpx.Timeout(
                connect=provider.connect_timeout_s,
                read=provider.read_timeout_s,
                write=provider.connect_timeout_s,
                pool=provider.connect_timeout_s,
            )
            # The loop's runs share one client: they take turns on one thread, so its pool's
            # lock is never contended.
            clients = [
                httpx.Client(timeout=timeout, transport=abortable_transport(on_loop=on_loop))
                for _ in range(1 if on_loop else settings.AIQUEUE_HTTP_CLIENTS)
            ]
            entry = _clients[key] = (clients, itertools.count())
        clients, turns = entry
        return clients[next(turns) % len(clients)]
