"""Concurrency caps as Redis leases, with a wait list per capped resource.

A resource (a provider's `max_concurrency`, a workload's `concurrency_cap`) is a sorted set of
holders scored by their lease expiry (Redis time, ms). Acquiring drops expired holders, then
adds one if there is room; the runner's heartbeat renews the expiry. A worker that dies simply
stops renewing, and its slot frees itself when the lease expires: nobody has to notice.

A job that finds a resource full is added, in the same atomic script, to that resource's
wait list: a sorted set scored by priority then submit time. Releasing a lease pops the first
waiter, and the caller resumes it (`runs.admission`). Because the check and the wait-list
entry are one script, a release can never slip in between and be missed; the parked job also
carries a fallback wake-up time, so a waiter is never forgotten even if a waker died.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import redis
from django.conf import settings

from jobs import queueing
from jobs.flow import script_refused
from jobs.models import Job, Priority, Workload

log = logging.getLogger(__name__)

# One hash tag for every lease and wait list ({leases}): one acquire spans several resources
# (workload, provider), and a script's keys must share a slot (jobs.flow).
LEASE_KEY = "aiqueue:{{leases}}:lease:{resource}"
WAIT_KEY = "aiqueue:{{leases}}:wait:{resource}"
PRIORITY_RANK = {Priority.HIGH: 0, Priority.DEFAULT: 1, Priority.LOW: 2}
# The score of a waiter: priority first, then submit time in ms (< 1e13 until year 2286).
RANK_WEIGHT = 10**13

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: n lease keys, then n wait keys. ARGV: member, ttl_ms, waiter, wait_score, limits...
# Returns {0, 0, 0} when acquired, else {index of the full resource (1-based), in use, limit}.
_ACQUIRE = (
    _NOW_MS
    + """
local n = #KEYS / 2
local member, ttl = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
end
for i = 1, n do
  local limit = tonumber(ARGV[4 + i])
  local used = redis.call('ZCARD', KEYS[i])
  if used >= limit then
    redis.call('ZADD', KEYS[n + i], 'NX', ARGV[4], ARGV[3])
    return {i, used, limit}
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + ttl, member)
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
  redis.call('ZREM', KEYS[n + i], ARGV[3])
end
return {0, 0, 0}
"""
)

# KEYS: lease keys. ARGV: member, ttl_ms. Renews only leases still held (XX).
_RENEW = (
    _NOW_MS
    + """
local renewed = 0
for i = 1, #KEYS do
  renewed = renewed + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]) * 2)
end
return renewed
"""
)

# KEYS: n lease keys, then n wait keys. ARGV: member. Pops the first waiter of each resource
# ('' where a resource has none).
_RELEASE = """
local n = #KEYS / 2
local woken = {}
for i = 1, n do
  redis.call('ZREM', KEYS[i], ARGV[1])
  local first = redis.call('ZRANGE', KEYS[n + i], 0, 0)
  if first[1] then
    redis.call('ZREM', KEYS[n + i], first[1])
    table.insert(woken, first[1])
  else
    table.insert(woken, '')
  end
end
return woken
"""

# KEYS: lease key. Holders whose lease has not expired.
_COUNT = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)


@dataclass(frozen=True)
class Resource:
    """One capped thing: `name` keys it in Redis, `label` is what people read."""

    name: str
    label: str
    limit: int


def resources_for(workload: Workload) -> list[Resource]:
    provider = workload.provider
    found = []
    if provider.max_concurrency:
        found.append(Resource(f"provider:{provider.pk}", provider.name, provider.max_concurrency))
    if workload.concurrency_cap:
        found.append(
            Resource(
                f"workload:{workload.pk}", f"workload {workload.name}", workload.concurrency_cap
            )
        )
    return found


@dataclass
class Lease:
    resources: list[Resource]
    member: str = field(default_factory=lambda: uuid.uuid4().hex)

    def renew(self) -> None:
        renew(self)


@dataclass(frozen=True)
class Refused:
    resource: Resource
    in_use: int
    limit: int
    unchecked: bool = False  # Redis refused the script: the cap could not be checked

    @property
    def reason(self) -> str:
        if self.unchecked:
            return f"concurrency cap unchecked (Redis refused the script) for {self.resource.label}"
        return f"concurrency cap full ({self.in_use}/{self.limit}) for {self.resource.label}"


def connection() -> redis.Redis:
    return queueing.connection()


def ttl_ms() -> int:
    # At least three heartbeats, so one slow beat never drops a live lease.
    ttl = max(settings.AIQUEUE_LEASE_TTL, 3 * settings.AIQUEUE_HEARTBEAT_INTERVAL)
    return int(ttl * 1000)


def wait_score(job: Job) -> float:
    return PRIORITY_RANK.get(job.priority, 1) * RANK_WEIGHT + int(job.created_at.timestamp() * 1000)


def _keys(resources: list[Resource]) -> list[str]:
    return [LEASE_KEY.format(resource=r.name) for r in resources] + [
        WAIT_KEY.format(resource=r.name) for r in resources
    ]


def acquire(job: Job, resources: list[Resource]) -> Lease | Refused:
    """A slot on every resource at once, or none. On refusal the job is on the full
    resource's wait list. Fails open (returns a lease) when Redis is unreachable, closed
    (refused, not on a wait list: its fallback wake-up asks again) when Redis refuses the
    script."""
    lease = Lease(resources)
    if not resources:
        return lease
    try:
        index, used, limit = connection().eval(
            _ACQUIRE,
            2 * len(resources),
            *_keys(resources),
            lease.member,
            ttl_ms(),
            str(job.code),
            wait_score(job),
            *[r.limit for r in resources],
        )
    except redis.RedisError as exc:
        if script_refused(exc, f"concurrency caps of job={job.code}"):
            return Refused(resources[0], 0, resources[0].limit, unchecked=True)
        log.warning("job=%s leases unavailable, running without a cap: %s", job.code, exc)
        return lease
    if index:
        return Refused(resources[int(index) - 1], int(used), int(limit))
    return lease


def renew(lease: Lease) -> None:
    if not lease.resources:
        return
    keys = [LEASE_KEY.format(resource=r.name) for r in lease.resources]
    try:
        connection().eval(_RENEW, len(keys), *keys, lease.member, ttl_ms())
    except redis.RedisError as exc:
        log.warning("lease renewal failed: %s", exc)


def release(lease: Lease) -> list[str]:
    """Free the slots; returns, per resource, the code of its first waiter (popped from the
    wait list) or ''."""
    if not lease.resources:
        return []
    try:
        woken = connection().eval(
            _RELEASE, 2 * len(lease.resources), *_keys(lease.resources), lease.member
        )
    except redis.RedisError as exc:
        log.warning("lease release failed (it will expire by itself): %s", exc)
        return []
    return [w.decode() if isinstance(w, bytes) else w for w in woken]


def pop_waiter(resource: Resource) -> str | None:
    try:
        popped = connection().zpopmin(WAIT_KEY.format(resource=resource.name))
    except redis.RedisError:
        return None
    if not popped:
        return None
    member = popped[0][0]
    return member.decode() if isinstance(member, bytes) else member


def in_use(resource: Resource) -> int:
    """Live (unexpired) holders of the resource."""
    return int(connection().eval(_COUNT, 1, LEASE_KEY.format(resource=resource.name)))


def waiters(resource: Resource) -> list[str]:
    members = connection().zrange(WAIT_KEY.format(resource=resource.name), 0, -1)
    return [m.decode() if isinstance(m, bytes) else m for m in members]
