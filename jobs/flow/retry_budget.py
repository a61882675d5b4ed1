"""Retry budget per provider: retries may only be a small fraction of recent calls.

Every provider call is recorded in a sliding window (default 60 s) shared by all workers;
a retry is let through only while `retries / calls` stays under the provider's
`retry_budget_ratio` (SRE book: ~10 %), with a small floor so a quiet provider can still retry
a few times a minute. A retry that does not fit is not made: the caller parks the job.

This is what stops a retry storm: when a provider degrades, retries cannot multiply the load
on it, whatever the number of workers. State: two sorted sets per provider (calls, retries),
scored by Redis time in ms, trimmed to the window by the same atomic Lua script that decides.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import redis
from django.conf import settings

from jobs import queueing

log = logging.getLogger(__name__)

KEY = "aiqueue:retry_budget:{provider}:{kind}"

# KEYS: calls zset, retries zset. ARGV: is_retry, ratio, floor, window_ms, member.
# Returns {allowed, calls, retries} as counted before this call.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local calls = redis.call('ZCARD', KEYS[1])
local retries = redis.call('ZCARD', KEYS[2])
if ARGV[1] == '1' then
  local allowed = math.max(tonumber(ARGV[3]), tonumber(ARGV[2]) * calls)
  if retries + 1 > allowed then
    return {0, calls, retries}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[2], window + 1000)
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return {1, calls, retries}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    calls: int  # in the window, before this call
    retries: int


def _connection() -> redis.Redis:
    return queueing.connection()


def _keys(provider_id: int) -> list[str]:
    return [KEY.format(provider=provider_id, kind=k) for k in ("calls", "retries")]


def acquire(provider, *, is_retry: bool) -> Decision:
    """Record a call about to be made; for a retry, first check it fits the budget.

    A first call is always allowed (and recorded). A retry that does not fit is not recorded.
    """
    try:
        allowed, calls, retries = _connection().eval(
            _SCRIPT,
            2,
            *_keys(provider.pk),
            "1" if is_retry else "0",
            repr(float(provider.retry_budget_ratio)),
            str(settings.AIQUEUE_RETRY_BUDGET_FLOOR),
            str(settings.AIQUEUE_RETRY_BUDGET_WINDOW * 1000),
            uuid.uuid4().hex,
        )
    except redis.RedisError as exc:
        log.warning("retry budget unavailable for provider=%s, allowing: %s", provider.pk, exc)
        return Decision(True, 0, 0)
    return Decision(bool(allowed), int(calls), int(retries))


def usage(provider) -> dict[str, int]:
    """Calls and retries in the current window (for the admin and tests)."""
    connection = _connection()
    window_ms = settings.AIQUEUE_RETRY_BUDGET_WINDOW * 1000
    seconds, micros = connection.time()
    cutoff = seconds * 1000 + micros // 1000 - window_ms
    calls_key, retries_key = _keys(provider.pk)
    return {
        "calls": connection.zcount(calls_key, cutoff + 1, "+inf"),
        "retries": connection.zcount(retries_key, cutoff + 1, "+inf"),
    }
