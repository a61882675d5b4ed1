"""Browser tests: real chromium (Debian's package) driven by Playwright, against the real ASGI
server and a real worker, each started by the suite as its own process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from django.conf import settings

from aiqueue.redis_server import free_port
from tests.browser.pages import LiveApp
from tests.helpers import BASE_DIR, database_url, spawn, wait_for_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Playwright's sync API runs an event loop in the test thread; the ORM calls the tests make
# there (fixtures, assertions) are ordinary blocking calls.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def live_app(transactional_db, simulator, redis_conn, tmp_path):
    """uvicorn serving aiqueue.asgi plus one worker, sharing the test database and Redis."""
    port = free_port()
    env = {
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "AIQUEUE_SIMULATOR_URL": simulator.url,
        "AIQUEUE_RECONCILE_INTERVAL": "2",
        "PYTHONPATH": str(BASE_DIR),
    }

    def start_web() -> subprocess.Popen:
        return spawn(
            [sys.executable, "-m", "uvicorn", "aiqueue.asgi:application", "--port", str(port),
             "--log-level", "warning"],
            tmp_path,
            env,
        )  # fmt: skip

    app = LiveApp(url=f"http://127.0.0.1:{port}", port=port, start_web=start_web, web=start_web())
    worker = spawn([sys.executable, "manage.py", "worker", "--no-scheduler"], tmp_path, env)
    try:
        wait_for_port(port)
        yield app
    finally:
        for process in (app.web, worker):
            process.terminate()
        for process in (app.web, worker):
            process.wait(timeout=15)


@pytest.fixture(scope="package")
def browser():
    """One chromium for the browser tests, closed after the last of them: Playwright's event loop
    lives as long as it does, and the ORM's async_to_sync cannot run under it."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed; ./test installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    # Assertions wait as long as actions do: on CI two suites share two cores, and an htmx swap
    # can take longer than Playwright's default 5 s there.
    expect.set_options(timeout=15_000)
    yield page
    context.close()
