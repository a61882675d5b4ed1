"""The peers' side of bench/peers.py: the same job for arq and for Celery, and their enqueue.

Runs in the peers' own virtualenv (bench/peers.py makes it; neither arq nor Celery is a
dependency of aiqueue), so it imports nothing of the project. The job is what issue #22's T5
gives each peer: make the one provider call (POST /v1/chat/completions on the simulator, the
endpoint aiqueue's worker calls) and write its answer onto the job's row with one SQL
statement, the row bench/floor.py's `enqueue` made. Started and finished times go on the row
too, so `Stack.run_span` measures every side the same way.

Configuration comes from the environment: PEER_REDIS_URL, PEER_SIM_URL, PEER_SQLITE (the
database file), PEER_CONCURRENCY.

    python bench/peer_jobs.py enqueue arq|celery <file of pks, one per line>
"""

from __future__ import annotations

import os
import sqlite3
import sys
from datetime import UTC, datetime

REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")
SIM_URL = os.environ.get("PEER_SIM_URL", "http://127.0.0.1:8001")
SQLITE = os.environ.get("PEER_SQLITE", "")
CONCURRENCY = int(os.environ.get("PEER_CONCURRENCY", "100"))

# Django's own column names and SQLite datetime format (naive UTC text, USE_TZ=True).
ANSWER_SQL = (
    "UPDATE jobs_job SET status = 'succeeded', output_text = ?, started_at = ?, finished_at = ?"
    " WHERE id = ?"
)


def request_body(pk: int) -> dict:
    return {
        "model": "sim-small",
        "messages": [{"role": "user", "content": f"floor text number {pk}"}],
        "max_tokens": 40,
    }


def now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")


_db: sqlite3.Connection | None = None


def answer(pk: int, started: str, body: dict) -> None:
    """The job's one SQL statement. One connection per process: arq's tasks and Celery's
    greenlets all run on one thread, and each statement runs to its end without a switch."""
    global _db
    if _db is None:
        _db = sqlite3.connect(SQLITE, timeout=30, isolation_level=None, check_same_thread=False)
    text = body["choices"][0]["message"]["content"]
    _db.execute(ANSWER_SQL, (text, started, now(), pk))


# --------------------------------------------------------------------------- arq


async def arq_call(ctx: dict, pk: int) -> None:
    started = now()
    response = await ctx["http"].post(f"{SIM_URL}/v1/chat/completions", json=request_body(pk))
    response.raise_for_status()
    answer(pk, started, response.json())


async def _arq_startup(ctx: dict) -> None:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=CONCURRENCY)
    ctx["http"] = httpx.AsyncClient(limits=limits, timeout=120)


async def _arq_shutdown(ctx: dict) -> None:
    await ctx["http"].aclose()


def _arq_settings():
    from arq.connections import RedisSettings

    class WorkerSettings:
        functions = [arq_call]
        redis_settings = RedisSettings.from_dsn(REDIS_URL)
        max_jobs = CONCURRENCY
        keep_result = 0
        # arq polls its queue; 0.05 s is what PERF-NOTES measured it at (its default is 0.5).
        poll_delay = 0.05
        on_startup = _arq_startup
        on_shutdown = _arq_shutdown

    return WorkerSettings


if "arq" in sys.argv[0] or os.environ.get("PEER_KIND") == "arq":
    WorkerSettings = _arq_settings()


# --------------------------------------------------------------------------- Celery


def _celery_app():
    from celery import Celery

    app = Celery("peer_jobs", broker=REDIS_URL)
    app.conf.update(
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    session = None

    @app.task(name="peer_jobs.call")
    def call(pk: int) -> None:
        nonlocal session
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter

            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=CONCURRENCY)
            session.mount("http://", adapter)
        started = now()
        response = session.post(
            f"{SIM_URL}/v1/chat/completions", json=request_body(pk), timeout=120
        )
        response.raise_for_status()
        answer(pk, started, response.json())

    return app


if "celery" in sys.argv[0] or os.environ.get("PEER_KIND") == "celery":
    app = _celery_app()


# --------------------------------------------------------------------------- enqueue


def enqueue(kind: str, pks: list[int]) -> None:
    if kind == "arq":
        import asyncio

        from arq import create_pool
        from arq.connections import RedisSettings

        async def push() -> None:
            pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
            for pk in pks:
                await pool.enqueue_job("arq_call", pk)
            await pool.aclose()

        asyncio.run(push())
    elif kind == "celery":
        celery_app = _celery_app()
        with celery_app.producer_or_acquire() as producer:
            for pk in pks:
                celery_app.send_task("peer_jobs.call", (pk,), producer=producer)
    else:
        raise SystemExit(f"unknown peer {kind!r}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "enqueue":
        raise SystemExit(__doc__)
    with open(sys.argv[3]) as listing:
        enqueue(sys.argv[2], [int(line) for line in listing if line.strip()])
