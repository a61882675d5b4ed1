"""Circuit breaker per provider, shared by all workers through Redis.

    closed ──(breaker_failure_threshold consecutive retryable failures)──> open
    open ──(breaker_cooldown_s passed; the first caller becomes the probe)──> half_open
    half_open ──(the probe succeeds)──> closed
    half_open ──(the probe fails)──> open (a new cooldown)

While open (and while a half-open probe is in flight) calls are not made: the runner parks the
job until the probe time, or uses the workload's fallback provider if that one is closed. Only
one probe is let through at a time across all workers: granting it is one atomic Lua script.
A probe whose worker died stops blocking others once its lease (the read timeout plus a
margin) runs out.

Any answer from the provider counts as a success here, a 400 included: the breaker is about
the provider being reachable and healthy, not about our requests being right. Configuration
errors (no call made) count as neither.

State: a hash `aiqueue:breaker:<provider id>` and a short history list of transitions, shown
on the provider's admin page, where an operator can reset it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis

from jobs import queueing

log = logging.getLogger(__name__)

KEY = "aiqueue:breaker:{provider}"
HISTORY_KEY = "aiqueue:breaker:{provider}:history"
HISTORY_LENGTH = 50
PROBE_MARGIN_S = 5

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function remember(from, to, reason)
  redis.call('LPUSH', KEYS[2], cjson.encode({at = now, from = from, to = to, reason = reason}))
  redis.call('LTRIM', KEYS[2], 0, HISTORY_LAST)
end
""".replace("HISTORY_LAST", str(HISTORY_LENGTH - 1))

# ARGV: allow_probe (0/1), probe_lease_ms. Returns {verdict, until_ms, now_ms} where verdict is
# closed (call freely), probe (call: you are the half-open probe), open or busy (do not call;
# until_ms is the probe time, or the end of the running probe's lease).
_ACQUIRE = (
    _PRELUDE
    + """
if state == 'closed' then
  return {'closed', 0, now}
end
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
if now < until_ms or ARGV[1] == '0' then
  if state == 'open' then return {'open', until_ms, now} end
  return {'busy', until_ms, now}
end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_at', now + tonumber(ARGV[2]))
if state == 'open' then
  remember('open', 'half_open', 'cooldown over: one probe let through')
end
return {'probe', now + tonumber(ARGV[2]), now}
"""
)

# ARGV: outcome (success / failure / release), was_probe (0/1), threshold, cooldown_ms, reason.
# Returns the state after the call.
_RECORD = (
    _PRELUDE
    + """
local outcome, was_probe = ARGV[1], ARGV[2] == '1'
if outcome == 'success' then
  if state == 'closed' then
    redis.call('HSET', KEYS[1], 'failures', 0)
  elseif state == 'half_open' and was_probe then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_at', 0)
    remember('half_open', 'closed', 'probe succeeded')
    return 'closed'
  end
  return state
end
if outcome == 'failure' then
  if state == 'closed' then
    local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now,
                 'probe_at', now + tonumber(ARGV[4]))
      remember('closed', 'open', failures .. ' consecutive failures; last: ' .. ARGV[5])
      return 'open'
    end
  elseif state == 'half_open' and was_probe then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now,
               'probe_at', now + tonumber(ARGV[4]))
    remember('half_open', 'open', 'probe failed: ' .. ARGV[5])
    return 'open'
  end
  return state
end
if outcome == 'release' and state == 'half_open' and was_probe then
  -- The probe was granted but no call was made: let the next caller probe at once.
  redis.call('HSET', KEYS[1], 'state', 'open', 'probe_at', now)
  return 'open'
end
return state
"""
)

# ARGV: reason.
_RESET = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_at', 0)
remember(state, 'closed', ARGV[1])
return state
"""
)


@dataclass(frozen=True)
class Permit:
    """The breaker's answer to "may I call this provider now?"."""

    verdict: str  # closed | probe | open | busy
    until: datetime | None = None  # when open/busy: when it is worth asking again

    @property
    def allowed(self) -> bool:
        return self.verdict in ("closed", "probe")

    @property
    def is_probe(self) -> bool:
        return self.verdict == "probe"


@dataclass
class Status:
    state: str = CLOSED
    failures: int = 0
    opened_at: datetime | None = None
    probe_at: datetime | None = None
    history: list[dict] = field(default_factory=list)


def _connection() -> redis.Redis:
    return queueing.connection()


def _keys(provider_id: int) -> list[str]:
    return [KEY.format(provider=provider_id), HISTORY_KEY.format(provider=provider_id)]


def _as_datetime(ms: int | float | str | bytes | None) -> datetime | None:
    value = float(ms or 0)
    return datetime.fromtimestamp(value / 1000, tz=UTC) if value else None


def acquire(provider, *, allow_probe: bool = True) -> Permit:
    """Ask before calling `provider`. With `allow_probe=False` only a closed breaker says yes
    (a fallback provider is used only when it is healthy, never to probe it)."""
    lease_ms = int((provider.read_timeout_s + PROBE_MARGIN_S) * 1000)
    try:
        verdict, until_ms, _now = _connection().eval(
            _ACQUIRE, 2, *_keys(provider.pk), "1" if allow_probe else "0", str(lease_ms)
        )
    except redis.RedisError as exc:
        log.warning("breaker unavailable for provider=%s, allowing: %s", provider.pk, exc)
        return Permit("closed")
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    return Permit(verdict, _as_datetime(until_ms) if verdict in ("open", "busy") else None)


def record(provider, *, ok: bool, was_probe: bool, reason: str = "") -> str:
    """Report a call's outcome (`ok`: the provider answered). Returns the state after it."""
    return _record(provider, "success" if ok else "failure", was_probe, reason)


def release(provider, *, was_probe: bool) -> None:
    """A permit was granted but no call was made (budget exhausted, configuration error)."""
    if was_probe:
        _record(provider, "release", True, "")


def _record(provider, outcome: str, was_probe: bool, reason: str) -> str:
    try:
        state = _connection().eval(
            _RECORD,
            2,
            *_keys(provider.pk),
            outcome,
            "1" if was_probe else "0",
            str(provider.breaker_failure_threshold),
            str(int(provider.breaker_cooldown_s * 1000)),
            reason[:200],
        )
    except redis.RedisError as exc:
        log.warning("breaker unavailable for provider=%s: %s", provider.pk, exc)
        return CLOSED
    state = state.decode() if isinstance(state, bytes) else state
    if outcome != "success" and state == OPEN:
        log.warning("breaker for provider=%s is open: %s", provider.pk, reason)
    return state


def reset(provider, *, by: str) -> str:
    """Close the breaker by hand. Returns the state it was in."""
    previous = _connection().eval(_RESET, 2, *_keys(provider.pk), f"reset by {by}"[:200])
    return previous.decode() if isinstance(previous, bytes) else previous


def status(provider, *, history: int = 20) -> Status:
    connection = _connection()
    key, history_key = _keys(provider.pk)
    raw = {k.decode(): v.decode() for k, v in connection.hgetall(key).items()}
    entries = []
    for item in connection.lrange(history_key, 0, history - 1):
        entry = json.loads(item)
        entry["at"] = _as_datetime(entry.get("at"))
        entries.append(entry)
    state = raw.get("state", CLOSED)
    return Status(
        state=state,
        failures=int(raw.get("failures") or 0),
        opened_at=_as_datetime(raw.get("opened_at")) if state != CLOSED else None,
        probe_at=_as_datetime(raw.get("probe_at")) if state != CLOSED else None,
        history=entries,
    )
