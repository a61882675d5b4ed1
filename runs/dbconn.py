"""Database connections in threaded workers.

Django keeps one connection per thread. A worker thread that waits seconds on an AI provider
would hold its connection all that time, so 100 threads would need 100 connections. With
PostgreSQL's pool on (AIQUEUE_DB_POOL, Django's psycopg pool), `release_while_waiting()` gives
the thread's connection back to the pool before a slow wait; the next query takes one again.
Without a pool it does nothing: a fresh PostgreSQL connection costs milliseconds, and SQLite
connections are cheap file handles.
"""

from __future__ import annotations

from django.db import close_old_connections, connections

from jobs.providers import loop


def is_pooled(alias: str = "default") -> bool:
    return bool(connections[alias].settings_dict.get("OPTIONS", {}).get("pool"))


def release_while_waiting() -> None:
    """Return this thread's pooled connections to the pool (unless inside a transaction).
    Not on the call loop (jobs.providers.loop): its runs share one connection, which the
    next run wants at once."""
    if loop.current() is not None:
        return
    for conn in connections.all(initialized_only=True):
        if conn.settings_dict.get("OPTIONS", {}).get("pool") and not conn.in_atomic_block:
            conn.close()


def end_of_job() -> None:
    """A job boundary, like the end of an HTTP request: pooled connections go back to the
    pool; others are closed if broken or older than CONN_MAX_AGE (SQLite keeps its handle)."""
    release_while_waiting()
    close_old_connections()
