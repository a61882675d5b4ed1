"""Flow control: what decides *when* a provider call may happen, shared through Redis.

One module per mechanism (`retry_budget`, `breaker`, and budgets, leases and rate limits as
they land). Each keeps its state in Redis, never in process memory, so every worker process on
every machine sees the same picture, and each uses Redis's clock (TIME inside Lua scripts) so
workers with drifting clocks still agree. When Redis cannot be reached they fail open: flow
control protects providers and budgets, it must not stop the queue by itself.

A script that Redis runs and refuses (a ResponseError: keys in different slots of a Redis
Cluster, a key of the wrong type, a bug in the script) is another matter: Redis is there and
says the deployment or the code is wrong. That is logged as an error and the limit fails
CLOSED (the call waits), never silently open (`script_refused`). aiqueue needs one Redis
primary, as RQ does (a managed one or Sentinel is fine; Cluster is not); the keys of each
script still share one {hash tag}, so a script never spans slots.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)


def script_refused(exc: redis.RedisError, what: str) -> bool:
    """Whether `exc` is Redis refusing the script for `what` (then logged as an error: the
    caller fails closed) rather than Redis being out of reach (the caller fails open)."""
    if isinstance(exc, redis.ResponseError):
        log.error(
            "%s: Redis refused the script (%s: %s); failing closed until this is fixed. "
            "aiqueue needs one Redis primary, not a Cluster.",
            what,
            type(exc).__name__,
            exc,
        )
        return True
    return False
