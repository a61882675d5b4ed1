"""pytest plugin (loaded with `-p tests.redis_server`): the suite's own Redis.

It must run before pytest-django loads the settings, because the queue and channel-layer
settings are built from REDIS_URL. It never touches the machine's Redis on 6379.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from aiqueue import redis_server

_process = None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    global _process
    port = redis_server.free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="aiqueue-test-redis-"))
    _process = redis_server.start(port, data_dir)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["AIQUEUE_TEST_REDIS_PORT"] = str(port)
    os.environ["AIQUEUE_TEST_REDIS_DIR"] = str(data_dir)
    # A test database of this run's own (see aiqueue/settings.py), so runs can overlap.
    os.environ["AIQUEUE_TEST_DB_NAME"] = str(data_dir / "test.sqlite3")
    os.environ["AIQUEUE_TEST_RUN_ID"] = uuid.uuid4().hex[:12]
    # Debug is off in the suite, as in production, so settings want a real key: this run's own.
    os.environ.setdefault("AIQUEUE_SECRET_KEY", secrets.token_urlsafe(50))


def pytest_unconfigure(config) -> None:
    if _process is not None and _process.poll() is None:
        _process.terminate()
        _process.wait(timeout=10)
    shutil.rmtree(os.environ.get("AIQUEUE_TEST_REDIS_DIR", ""), ignore_errors=True)
