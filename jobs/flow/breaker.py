"""Circuit breaker per provider, shared by all workers through Redis.

    closed ──(breaker_failure_threshold consecutive retryable failures, or a failure that
              brings the window's failure rate to breaker_failure_rate)──> open
    open ──(the open time passed; the first caller becomes the probe)──> half_open
    half_open ──(breaker_probe_successes probes in a row succeed)──> closed
    half_open ──(a probe fails)──> open (a new open time)

Two rules open it, side by side. The consecutive rule sees a provider that is down; the
failure-rate rule sees one that fails often but not in a row (half of its calls, say). The
window is the last `breaker_window_calls` calls, of which only those of the last
`breaker_window_s` seconds count, and the rate is judged only once it holds
`breaker_min_calls` (resilience4j's failureRateThreshold / slidingWindowSize /
minimumNumberOfCalls; the rate opens at or above the threshold, as there).

Callers turned away while it is open are counted (`Permit.turned_away`, reset at every
change of state): runs.retries brings only the first few back at the probe time and lets the
probes wake the rest, so a long outage does not wake every waiting job at every probe time.

The breaker stays open for `breaker_cooldown_s`, or longer if the failure that opened it came
with a longer Retry-After (at most ten cooldowns): the provider's hint may lengthen the wait,
never shorten it. (Taken as the open time itself, a 5 s Retry-After in a 60 s storm of 429s
made a probe every 5 s, 14 failed calls where the cooldown makes 4, and the storm did not end
sooner for it.) Then one probe at a time is let through; a failed probe re-opens it, so a
failing provider sees at most one probe per open time. Closing needs several successes in a
row: a provider answering half of its calls would close a one-probe breaker every other
time and let the whole backlog hammer it (the chance of N lucky probes is 1 in 2^N). The
window is not cleared on closing: if the provider still fails, the first failure judged on a
full window opens it again at once.

While open (and while a half-open probe is in flight) calls are not made: the runner parks the
job, or uses the workload's fallback provider if that one is closed. Granting a probe is one
atomic Lua script, so only one probe runs across all workers; a probe whose worker died stops
blocking others once its lease (the read timeout plus a margin) runs out.

Any answer from the provider counts as a success here, a 400 included: the breaker is about
the provider being reachable and healthy, not about our requests being right. Configuration
errors (no call made) count as neither.

State: a hash `aiqueue:breaker:<provider id>`, the window (a list of recent outcomes) and a
short history list of transitions, shown on the provider's admin page (where an operator can
reset it) and on the dashboard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis

from jobs import queueing
from jobs.flow import script_refused

log = logging.getLogger(__name__)

# One hash tag per provider ({breaker:<id>}): a script's keys share one slot (jobs.flow).
KEY = "aiqueue:{{breaker:{provider}}}"
HISTORY_KEY = "aiqueue:{{breaker:{provider}}}:history"
WINDOW_KEY = "aiqueue:{{breaker:{provider}}}:window"
HISTORY_LENGTH = 50
PROBE_MARGIN_S = 5
# A Retry-After keeps the breaker open for at most this many cooldowns.
MAX_OPEN_COOLDOWNS = 10

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

# ARGV: allow_probe (0/1), probe_lease_ms. Returns {verdict, until_ms, now_ms, turned_away}
# where verdict is closed (call freely), probe (call: you are the half-open probe), open or busy
# (do not call; until_ms is the probe time, or the end of the running probe's lease), and
# turned_away counts the callers told so since the breaker last changed state, this one included.
_ACQUIRE = (
    _PRELUDE
    + """
if state == 'closed' then
  return {'closed', 0, now, 0}
end
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
if now < until_ms or ARGV[1] == '0' then
  local turned_away = 0
  if ARGV[1] == '1' then turned_away = redis.call('HINCRBY', KEYS[1], 'turned_away', 1) end
  if state == 'open' then return {'open', until_ms, now, turned_away} end
  return {'busy', until_ms, now, turned_away}
end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_at', now + tonumber(ARGV[2]))
if state == 'open' then
  redis.call('HSET', KEYS[1], 'probe_ok', 0, 'turned_away', 0)
  remember('open', 'half_open', 'open time over: probing')
end
return {'probe', now + tonumber(ARGV[2]), now, 0}
"""
)

# KEYS: hash, history, window. ARGV: outcome (success / failure / release), was_probe (0/1),
# consecutive threshold, cooldown_ms, reason, failure-rate threshold, window calls, window ms,
# minimum calls, probe successes to close, open_ms hint (the failure's Retry-After; 0: none).
# Returns the state after the call.
_RECORD = (
    _PRELUDE
    + """
local outcome, was_probe = ARGV[1], ARGV[2] == '1'
local window_calls, window_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
local function note(ok)
  redis.call('LPUSH', KEYS[3], now .. ':' .. ok)
  redis.call('LTRIM', KEYS[3], 0, window_calls - 1)
  redis.call('PEXPIRE', KEYS[3], window_ms * 2)
end
local function open(from, why)
  local ms, hint = tonumber(ARGV[4]), tonumber(ARGV[11])
  ms = math.max(ms, math.min(hint, ms * MAX_COOLDOWNS))
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'probe_at', now + ms,
             'probe_ok', 0, 'turned_away', 0)
  remember(from, 'open', why)
  return 'open'
end
if outcome == 'success' then
  note(1)
  if state == 'closed' then
    redis.call('HSET', KEYS[1], 'failures', 0)
  elseif state == 'half_open' and was_probe then
    local ok = redis.call('HINCRBY', KEYS[1], 'probe_ok', 1)
    if ok >= tonumber(ARGV[10]) then
      redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_at', 0, 'probe_ok', 0,
                 'turned_away', 0)
      remember('half_open', 'closed', ok .. ' probes in a row succeeded')
      return 'closed'
    end
    -- Not enough yet: the next probe may go at once.
    redis.call('HSET', KEYS[1], 'probe_at', now)
  end
  return state
end
if outcome == 'failure' then
  note(0)
  if state == 'closed' then
    local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= tonumber(ARGV[3]) then
      return open('closed', failures .. ' consecutive failures; last: ' .. ARGV[5])
    end
    local calls, failed = 0, 0
    for _, entry in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
      local at, ok = string.match(entry, '^(%d+):(%d)$')
      if at and tonumber(at) > now - window_ms then
        calls = calls + 1
        if ok == '0' then failed = failed + 1 end
      end
    end
    if calls >= tonumber(ARGV[9]) and failed >= tonumber(ARGV[6]) * calls then
      return open('closed', failed .. ' of the last ' .. calls .. ' calls failed ('
                  .. math.floor(100 * failed / calls) .. ' %); last: ' .. ARGV[5])
    end
  elseif state == 'half_open' and was_probe then
    return open('half_open', 'probe failed: ' .. ARGV[5])
  end
  return state
end
if outcome == 'release' and state == 'half_open' and was_probe then
  -- The probe was granted but no call was made: let the next caller probe at once.
  redis.call('HSET', KEYS[1], 'probe_at', now)
end
return state
"""
).replace("MAX_COOLDOWNS", str(MAX_OPEN_COOLDOWNS))

# ARGV: reason. The window goes too: an operator's reset says the old failures no longer count.
_RESET = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_at', 0, 'probe_ok', 0,
           'turned_away', 0)
redis.call('DEL', KEYS[3])
remember(state, 'closed', ARGV[1])
return state
"""
)


@dataclass(frozen=True)
class Permit:
    """The breaker's answer to "may I call this provider now?"."""

    verdict: str  # closed | probe | open | busy
    until: datetime | None = None  # when open/busy: when it is worth asking again
    # When open/busy: how many callers were turned away since the breaker last changed state,
    # this one included (the first few come back to probe; the others wait to be woken).
    turned_away: int = 0

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
    probe_successes: int = 0
    # The failure-rate window as the rule sees it now: calls of the last breaker_window_s
    # among the last breaker_window_calls, and how many of them failed.
    window_calls: int = 0
    window_failures: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def failure_rate(self) -> float | None:
        return self.window_failures / self.window_calls if self.window_calls else None


def _connection() -> redis.Redis:
    return queueing.connection()


def _keys(provider_id: int) -> list[str]:
    return [
        KEY.format(provider=provider_id),
        HISTORY_KEY.format(provider=provider_id),
        WINDOW_KEY.format(provider=provider_id),
    ]


def _as_datetime(ms: int | float | str | bytes | None) -> datetime | None:
    value = float(ms or 0)
    return datetime.fromtimestamp(value / 1000, tz=UTC) if value else None


def acquire(provider, *, allow_probe: bool = True) -> Permit:
    """Ask before calling `provider`. With `allow_probe=False` only a closed breaker says yes
    (a fallback provider is used only when it is healthy, never to probe it)."""
    lease_ms = int((provider.read_timeout_s + PROBE_MARGIN_S) * 1000)
    try:
        verdict, until_ms, _now, turned_away = _connection().eval(
            _ACQUIRE, 3, *_keys(provider.pk), "1" if allow_probe else "0", str(lease_ms)
        )
    except redis.RedisError as exc:
        if script_refused(exc, f"breaker of provider={provider.pk}"):
            # As if open: ask again after a cooldown.
            until = datetime.now(tz=UTC) + timedelta(seconds=provider.breaker_cooldown_s)
            return Permit("open", until, 1)
        log.warning("breaker unavailable for provider=%s, allowing: %s", provider.pk, exc)
        return Permit("closed")
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    if verdict not in ("open", "busy"):
        return Permit(verdict)
    return Permit(verdict, _as_datetime(until_ms), int(turned_away))


def record(
    provider, *, ok: bool, was_probe: bool, reason: str = "", retry_after: float | None = None
) -> str:
    """Report a call's outcome (`ok`: the provider answered). Returns the state after it: a
    probe that gets `closed` back closed the breaker. `retry_after` (s), the provider's own
    hint, keeps a breaker this failure opens open for that long if it is longer than the
    cooldown."""
    return _record(provider, "success" if ok else "failure", was_probe, reason, retry_after)


def release(provider, *, was_probe: bool) -> None:
    """A permit was granted but no call was made (budget exhausted, configuration error)."""
    if was_probe:
        _record(provider, "release", True, "", None)


def _record(provider, outcome: str, was_probe: bool, reason: str, retry_after: float | None) -> str:
    try:
        state = _connection().eval(
            _RECORD,
            3,
            *_keys(provider.pk),
            outcome,
            "1" if was_probe else "0",
            str(provider.breaker_failure_threshold),
            str(int(provider.breaker_cooldown_s * 1000)),
            reason[:200],
            repr(float(provider.breaker_failure_rate)),
            str(provider.breaker_window_calls),
            str(int(provider.breaker_window_s * 1000)),
            str(provider.breaker_min_calls),
            str(provider.breaker_probe_successes),
            str(int((retry_after or 0) * 1000)),
        )
    except redis.RedisError as exc:
        if not script_refused(exc, f"breaker of provider={provider.pk}"):
            log.warning("breaker unavailable for provider=%s: %s", provider.pk, exc)
        return CLOSED
    state = state.decode() if isinstance(state, bytes) else state
    if outcome != "success" and state == OPEN:
        log.warning("breaker for provider=%s is open: %s", provider.pk, reason)
    return state


def reset(provider, *, by: str) -> str:
    """Close the breaker by hand. Returns the state it was in."""
    previous = _connection().eval(_RESET, 3, *_keys(provider.pk), f"reset by {by}"[:200])
    return previous.decode() if isinstance(previous, bytes) else previous


def status(provider, *, history: int = 20) -> Status:
    connection = _connection()
    key, history_key, window_key = _keys(provider.pk)
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(key)
        pipe.lrange(history_key, 0, history - 1)
        pipe.lrange(window_key, 0, -1)
        pipe.time()
        raw_hash, raw_history, raw_window, (seconds, micros) = pipe.execute()
    raw = {k.decode(): v.decode() for k, v in raw_hash.items()}
    entries = []
    for item in raw_history:
        entry = json.loads(item)
        entry["at"] = _as_datetime(entry.get("at"))
        entries.append(entry)
    cutoff = seconds * 1000 + micros // 1000 - provider.breaker_window_s * 1000
    calls = failed = 0
    for item in raw_window:
        at, _, ok = item.decode().partition(":")
        if int(at) > cutoff:
            calls += 1
            failed += ok == "0"
    state = raw.get("state", CLOSED)
    return Status(
        state=state,
        failures=int(raw.get("failures") or 0),
        opened_at=_as_datetime(raw.get("opened_at")) if state != CLOSED else None,
        probe_at=_as_datetime(raw.get("probe_at")) if state != CLOSED else None,
        probe_successes=int(raw.get("probe_ok") or 0) if state == HALF_OPEN else 0,
        window_calls=calls,
        window_failures=failed,
        history=entries,
    )
