"""Retry budget per provider: retries that fail may only be a small fraction of recent calls.

Every provider call is recorded in a sliding window (default 60 s) shared by all workers. A
retry is any call of a job after its first, wherever it happens: in the same run, after the
job was parked and resumed, after a worker restart (runs.retries counts the job's calls from
the ledger). A retry is let through only while the retries held in the window stay under
`max(floor, retry_budget_ratio × calls)` (SRE book: ~10 %). A retry holds its place while it
is in flight and, if it fails, until it leaves the window; a retry that succeeds gives its
place back at once (`refund`): the budget bounds retries that fail, which are the load a
struggling provider must not get, and successes earn the room to drain a backlog.

A retry that does not fit is not made: the caller parks the job and this module puts it on the
provider's wait list (priority, then submit order), in the same atomic script as the refusal.
Each refund and the breaker closing (`forgive`: its probes showed the provider healthy, so
retries that failed before no longer count) pop as many waiters as there is room for; the
caller resumes them. A parked job also has a fallback wake-up, so a waiter is never forgotten.

Why not count a resumed job as new work: then a job that failed, parked and came back was a
"first call" again, and a half-failing provider got the plain retry-until-3 pattern (1.5 calls
per job). Why refunds: counting resumed jobs as retries without them starved recovery, since
after a burst there is no new traffic to earn budget and only the floor got back in.

State: sorted sets per provider (calls, retries, waiters), scored by Redis time in ms (waiters
by rank), trimmed to the window by the same Lua scripts that decide.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import redis
from django.conf import settings

from jobs import queueing
from jobs.flow import script_refused
from jobs.flow.leases import wait_score

log = logging.getLogger(__name__)

# One hash tag per provider ({retry_budget:<id>}): its three keys go to one script (jobs.flow).
KEY = "aiqueue:{{retry_budget:{provider}}}:{kind}"
WAITERS_TTL_MS = 24 * 3600 * 1000
# At most this many waiters are woken by one refund: a burst is spread over several workers.
MAX_WAKE = 4

_TRIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local function room()
  local allowed = math.max(tonumber(ARGV[2]), tonumber(ARGV[1]) * redis.call('ZCARD', KEYS[1]))
  return allowed - redis.call('ZCARD', KEYS[2])
end
"""

# KEYS: calls, retries, waiters. ARGV: ratio, floor, window_ms, is_retry, member, force,
# waiter (a job code or ''), waiter score. Returns {allowed, calls, retries} as counted before
# this call.
_ACQUIRE = (
    _TRIM
    + """
local calls = redis.call('ZCARD', KEYS[1])
local retries = redis.call('ZCARD', KEYS[2])
if ARGV[4] == '1' then
  if ARGV[6] ~= '1' and room() < 1 then
    if ARGV[7] ~= '' then
      redis.call('ZADD', KEYS[3], 'NX', ARGV[8], ARGV[7])
      redis.call('PEXPIRE', KEYS[3], WAITERS_TTL)
    end
    return {0, calls, retries}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[2], window + 1000)
end
if ARGV[7] ~= '' then
  redis.call('ZREM', KEYS[3], ARGV[7])
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return {1, calls, retries}
"""
).replace("WAITERS_TTL", str(WAITERS_TTL_MS))

# KEYS: calls, retries, waiters. ARGV: ratio, floor, window_ms, member (the retry that
# succeeded; '' to forgive every retry in the window), max_wake. Returns the waiters popped.
_SETTLE = (
    _TRIM
    + """
if ARGV[4] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
local n = math.min(math.floor(room()), tonumber(ARGV[5]))
if n < 1 then return {} end
local woken = {}
local popped = redis.call('ZPOPMIN', KEYS[3], n)
for i = 1, #popped, 2 do table.insert(woken, popped[i]) end
return woken
"""
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    calls: int  # in the window, before this call
    retries: int
    member: str = ""  # names this call in the window (for `refund`)


def _connection() -> redis.Redis:
    return queueing.connection()


def _keys(provider_id: int) -> list[str]:
    return [KEY.format(provider=provider_id, kind=k) for k in ("calls", "retries", "waiters")]


def _args(provider) -> list[str]:
    return [
        repr(float(provider.retry_budget_ratio)),
        str(settings.AIQUEUE_RETRY_BUDGET_FLOOR),
        str(settings.AIQUEUE_RETRY_BUDGET_WINDOW * 1000),
    ]


def acquire(provider, *, is_retry: bool, force: bool = False, waiter=None) -> Decision:
    """Record a call about to be made; for a retry, first check it fits the budget.

    A first call is always allowed (and recorded); so is a retry with `force` (the breaker's
    half-open probe: the breaker bounds those). A retry that does not fit is not recorded, and
    `waiter` (the job) goes on the provider's wait list.
    """
    member = uuid.uuid4().hex
    try:
        allowed, calls, retries = _connection().eval(
            _ACQUIRE,
            3,
            *_keys(provider.pk),
            *_args(provider),
            "1" if is_retry else "0",
            member,
            "1" if force else "0",
            str(waiter.code) if waiter is not None else "",
            wait_score(waiter) if waiter is not None else 0,
        )
    except redis.RedisError as exc:
        if script_refused(exc, f"retry budget of provider={provider.pk}"):
            # Closed for retries (the job waits for its fallback wake-up); a first call is
            # never held back by the retry budget.
            return Decision(not is_retry, 0, 0)
        log.warning("retry budget unavailable for provider=%s, allowing: %s", provider.pk, exc)
        return Decision(True, 0, 0)
    return Decision(bool(allowed), int(calls), int(retries), member if is_retry else "")


def refund(provider, member: str) -> list[str]:
    """A retry succeeded: its place in the budget is free again. Returns the codes of the
    waiters popped for the room there now is (the caller resumes them)."""
    return _settle(provider, member)


def forgive(provider) -> list[str]:
    """The provider proved healthy again (its breaker closed): retries that failed before no
    longer count. Returns the waiters popped, as `refund` does."""
    return _settle(provider, "")


def _settle(provider, member: str) -> list[str]:
    try:
        woken = _connection().eval(
            _SETTLE, 3, *_keys(provider.pk), *_args(provider), member, str(MAX_WAKE)
        )
    except redis.RedisError as exc:
        if not script_refused(exc, f"retry budget of provider={provider.pk}"):
            log.warning("retry budget unavailable for provider=%s: %s", provider.pk, exc)
        return []
    return [code.decode() if isinstance(code, bytes) else code for code in woken]


def is_waiting(provider, code) -> bool:
    """Whether the job with `code` is still on the provider's wait list (a refund pops it)."""
    try:
        return _connection().zscore(_keys(provider.pk)[2], str(code)) is not None
    except redis.RedisError:
        return True  # cannot tell: its fallback wake-up brings it back


def usage(provider) -> dict[str, int]:
    """Calls and retries in the current window, and jobs waiting (for the admin and tests)."""
    connection = _connection()
    window_ms = settings.AIQUEUE_RETRY_BUDGET_WINDOW * 1000
    seconds, micros = connection.time()
    cutoff = seconds * 1000 + micros // 1000 - window_ms
    calls_key, retries_key, waiters_key = _keys(provider.pk)
    return {
        "calls": connection.zcount(calls_key, cutoff + 1, "+inf"),
        "retries": connection.zcount(retries_key, cutoff + 1, "+inf"),
        "waiting": connection.zcard(waiters_key),
    }
