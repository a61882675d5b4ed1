"""Draining a worker: an operator asks one worker process to stop taking jobs.

The request is a Redis key named after the worker (`KEY`), set by the operator's action
(jobs.operator.do_drain_worker) and read by the worker's dequeue loop about once a second
(runs.worker.Worker). A drained worker finishes the runs it has in flight, then
idles: it stays registered, beats and runs its maintenance pass (the reconciler), but takes no
job until the request is withdrawn. It does not exit, so a process manager does not start a
fresh worker in its place. The worker refreshes the key's expiry while it reads it, so a key
outlives a dead worker by `TTL_S` at most.
"""

from __future__ import annotations

import redis

from jobs import queueing

KEY = "aiqueue:drain:{name}"
TTL_S = 7 * 24 * 3600


def request(name: str) -> bool:
    """Ask worker `name` to drain; False if it already was asked."""
    return bool(queueing.connection().set(KEY.format(name=name), "1", nx=True, ex=TTL_S))


def withdraw(name: str) -> bool:
    """Let worker `name` take jobs again; False if it was not drained."""
    return bool(queueing.connection().delete(KEY.format(name=name)))


def is_requested(name: str) -> bool:
    """Whether worker `name` is asked to drain (the worker's own check: it also keeps the key
    alive). A Redis error reads as no: the worker's loop has its own handling of Redis away."""
    key = KEY.format(name=name)
    try:
        with queueing.connection().pipeline(transaction=False) as pipe:
            pipe.expire(key, TTL_S)
            pipe.exists(key)
            return bool(pipe.execute()[1])
    except redis.RedisError:
        return False


def requested(names: list[str]) -> set[str]:
    """Which of these workers are asked to drain (one round trip)."""
    if not names:
        return set()
    found = queueing.connection().mget([KEY.format(name=name) for name in names])
    return {name for name, value in zip(names, found, strict=True) if value is not None}
