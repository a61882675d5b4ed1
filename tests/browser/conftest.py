"""Browser tests: real chromium (Debian's package) driven by Playwright, against the real ASGI
server and a real worker, each started by the suite as its own process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.conf import settings

from aiqueue.redis_server import free_port
from tests.conftest import BASE_DIR, spawn

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


def database_url() -> str:
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{database['NAME']}"
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


@dataclass
class LiveApp:
    url: str
    port: int
    start_web: Callable[[], subprocess.Popen]
    web: subprocess.Popen

    def stop_web(self) -> None:
        """Stop the ASGI server (open websockets drop), e.g. to test reconnecting."""
        self.web.terminate()
        self.web.wait(timeout=15)

    def restart_web(self) -> None:
        if self.web.poll() is None:
            self.stop_web()
        self.web = self.start_web()
        wait_for_port(self.port)


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


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed; ./test installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def log_in(page, app: LiveApp, username: str, password: str) -> None:
    page.goto(f"{app.url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{app.url}/")


def answer_next_dialog(page, *, accept: bool) -> list[str]:
    """Answer the next dialog the page opens; the returned list gets its text."""
    seen: list[str] = []

    def answer(dialog) -> None:
        seen.append(dialog.message)
        if accept:
            dialog.accept()
        else:
            dialog.dismiss()

    page.once("dialog", answer)
    return seen
