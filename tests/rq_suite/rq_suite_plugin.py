"""pytest plugin for RQ's own test suite (the locked rq's sdist, which bin/setup-venv unpacks):
`-p rq_suite_plugin` runs RQ's tests with aiqueue's worker class in place of RQ's `Worker` and
`SimpleWorker`; with AIQUEUE_RQ_SUITE_WORKER=stock it leaves RQ's classes (the baseline).

RQ's tests talk to Redis on 127.0.0.1:6379 (the machine's, maybe someone else's): every
connection this process or its forks make to that port goes to a Redis of the run's own on a
free port instead. Django is set up on a database of the run's own, migrated, since aiqueue's
worker reads it (its maintenance pass runs the reconciler)."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import redis.connection

_redis = None
_data_dir: Path | None = None

RQ_DEFAULT_PORT = 6379


def _redirect_default_port(to_port: int) -> None:
    """In the pool's settings, not only its connections: RQ's tests copy them (SpawnWorker into
    a new interpreter, fixtures into forked processes)."""
    pool_init = redis.connection.ConnectionPool.__init__
    connection_init = redis.connection.Connection.__init__

    def init_pool(self, *args, **kwargs):
        if int(kwargs.get("port", to_port)) == RQ_DEFAULT_PORT:
            kwargs["port"] = to_port
        pool_init(self, *args, **kwargs)

    def init_connection(self, host="localhost", port=RQ_DEFAULT_PORT, *args, **kwargs):
        port = to_port if int(port) == RQ_DEFAULT_PORT else port
        connection_init(self, host, port, *args, **kwargs)

    redis.connection.ConnectionPool.__init__ = init_pool
    redis.connection.Connection.__init__ = init_connection


def _use_aiqueue_worker() -> None:
    import rq
    import rq.worker
    import rq.worker.worker_classes

    from runs.worker import Worker  # before the swap: it subclasses RQ's SimpleWorker

    for module in (rq, rq.worker, rq.worker.worker_classes):
        module.Worker = Worker
        module.SimpleWorker = Worker


def pytest_configure(config) -> None:
    global _redis, _data_dir
    from aiqueue import redis_server

    _data_dir = Path(tempfile.mkdtemp(prefix="aiqueue-rq-suite-"))
    port = redis_server.free_port()
    _redis = redis_server.start(port, _data_dir)
    _redirect_default_port(port)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["DATABASE_URL"] = f"sqlite:///{_data_dir / 'aiqueue.sqlite3'}"
    os.environ.setdefault("AIQUEUE_SECRET_KEY", secrets.token_urlsafe(50))
    os.environ["DJANGO_SETTINGS_MODULE"] = "aiqueue.settings"

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    # Read by the settings, and by RQ's CLI too, which some of RQ's tests run.
    del os.environ["REDIS_URL"]
    if os.environ.get("AIQUEUE_RQ_SUITE_WORKER", "aiqueue") != "stock":
        _use_aiqueue_worker()


_exit_status = 0


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    if _redis is not None and _redis.poll() is None:
        _redis.terminate()
        _redis.wait(timeout=10)
    if _data_dir is not None:
        shutil.rmtree(_data_dir, ignore_errors=True)
    # Some of RQ's tests leave a worker running on a thread of its own, which would keep this
    # process alive once its Redis is gone: the report is written, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
