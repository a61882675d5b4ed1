"""Rate limits per provider (requests/min and tokens/min) as GCRA in Redis.

GCRA (the generic cell rate algorithm) keeps one number per limit: the theoretical arrival
time (TAT) of the next unit. A call of cost c advances it by c × 60 s / limit; it is allowed
when the new TAT is at most 60 s ahead of now, i.e. up to a minute's quota may go at once
(as providers count it), and after that calls are spaced evenly. When a call is refused, GCRA
says exactly when it would be allowed, so the job is parked until then: no polling.

Both limits are checked and consumed by one Lua script, using Redis's clock: either both
admit the call or neither is charged. Token cost is the job's worst-case estimate (input +
max output), so a provider's tokens/min is never exceeded by our own accounting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from jobs import queueing
from jobs.flow import script_refused
from jobs.models import Provider

log = logging.getLogger(__name__)

# One hash tag per provider ({gcra:<id>}): its rpm and tpm keys go to one script (jobs.flow).
KEY = "aiqueue:{{gcra:{provider}}}:{unit}"
PERIOD_MS = 60_000

# KEYS: one TAT key per limit. ARGV: per key (increment_ms, tau_ms).
# Returns "0" when allowed (and charged), else the wait in ms and the index of the limit.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait, which = 0, 0
local new_tats = {}
for i = 1, #KEYS do
  local increment = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + increment
  local allow_at = new_tat - tau
  if allow_at > now and allow_at - now > wait then
    wait, which = allow_at - now, i
  end
  new_tats[i] = new_tat
end
if wait > 0 then
  return {tostring(wait), which}
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tostring(new_tats[i]), 'PX', math.ceil(new_tats[i] - now) + 1000)
end
return {'0', 0}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    wait_s: float = 0.0
    limit: str = ""

    @property
    def reason(self) -> str:
        return f"rate limit ({self.limit}) reached; retrying in {self.wait_s:.1f} s"


def _limits(provider: Provider, tokens: int) -> list[tuple[str, str, int, int]]:
    """(key, label, increment_ms, tau_ms) for each configured limit."""
    limits = []
    if provider.rpm_limit:
        limits.append(
            (
                KEY.format(provider=provider.pk, unit="rpm"),
                f"{provider.rpm_limit} requests/min for {provider.name}",
                PERIOD_MS / provider.rpm_limit,
                PERIOD_MS,
            )
        )
    if provider.tpm_limit:
        # A call bigger than a whole minute's quota could never pass: charge it the quota.
        cost = min(max(tokens, 1), provider.tpm_limit)
        limits.append(
            (
                KEY.format(provider=provider.pk, unit="tpm"),
                f"{provider.tpm_limit} tokens/min for {provider.name}",
                cost * PERIOD_MS / provider.tpm_limit,
                PERIOD_MS,
            )
        )
    return limits


def acquire(provider: Provider, tokens: int) -> Decision:
    """Charge one request of `tokens` tokens, or say how long to wait. Fails open when Redis
    is out of reach, closed (wait a period) when it refuses the script."""
    limits = _limits(provider, tokens)
    if not limits:
        return Decision(True)
    args: list[float] = []
    for _key, _label, increment, tau in limits:
        args += [increment, tau]
    try:
        wait_ms, which = queueing.connection().eval(
            _SCRIPT, len(limits), *[key for key, *_ in limits], *args
        )
    except redis.RedisError as exc:
        if script_refused(exc, f"rate limits of {provider.name}"):
            return Decision(False, wait_s=PERIOD_MS / 1000, limit="unchecked: Redis refused it")
        log.warning("rate limiter unavailable for %s, not limiting: %s", provider.name, exc)
        return Decision(True)
    wait = float(wait_ms)
    if wait <= 0:
        return Decision(True)
    return Decision(False, wait_s=wait / 1000, limit=limits[int(which) - 1][1])
