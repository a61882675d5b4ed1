"""The suite's helpers besides the factories (tests/factories.py): real processes (workers,
servers, copies of the repository), waiting on what they do, and RQ's queues as a test reads
them. Every test module and conftest takes them from here, never from another test module."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import django_rq
import httpx
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.test import TestCase
from django.utils import timezone

from jobs.flow import breaker, leases
from jobs.models import Job, Provider

BASE_DIR = Path(__file__).resolve().parent.parent

log = logging.getLogger(__name__)

# What a checkout holds besides the code: none of it belongs in a copy of the repository.
NOT_COPIED = shutil.ignore_patterns(".venv", "var", ".git", "__pycache__", "*.pyc", ".ci")
# The admin password a ./run in a copy is started with.
RUN_ADMIN_PASSWORD = "pw-admin-run-123"


# --------------------------------------------------------------------------- waiting


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> float:
    """Poll until `predicate()` is true; return the seconds it took. Fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_for_url(url: str, timeout: float) -> None:
    """Until `url` answers 200."""

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"{url} did not answer 200 within {timeout} s") from None


def wait_for_port(port: int, timeout: float = 20) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, timeout, interval=0.1)
    except AssertionError:
        raise RuntimeError(f"nothing listening on {port} after {timeout} s") from None


def run_on_commit_callbacks(using: str = DEFAULT_DB_ALIAS) -> int:
    """In a test that rolls back: do what a commit would do now, i.e. run the on-commit
    callbacks registered so far (and those they register) and forget them. Returns how many ran.

    pytest-django's `django_capture_on_commit_callbacks(execute=True)` does the same for the
    callbacks registered inside its block; this is for code that has no such block around it,
    the worker's runs (the `run_worker` fixture)."""
    ran = 0
    pending, connections[using].run_on_commit = connections[using].run_on_commit, []
    # What the pending callbacks register in turn runs when the block ends.
    with TestCase.captureOnCommitCallbacks(using=using, execute=True) as callbacks:
        for _savepoints, callback, robust in pending:
            ran += 1
            if robust:
                try:
                    callback()
                except Exception:
                    log.exception("on-commit callback %s failed", callback.__qualname__)
            else:
                callback()
    # A commit leaves no callback behind (jobs.live.stale_on_commit looks for its own there).
    connections[using].run_on_commit = []
    return ran + len(callbacks)


def queued_ids() -> list[str]:
    """The RQ ids waiting in every queue, in queue order."""
    return [
        job_id
        for name in settings.RQ_QUEUE_NAMES
        for job_id in django_rq.get_queue(name).get_job_ids()
    ]


def run_scheduled_now(job: Job, run_worker: Callable[[], None]) -> None:
    """Do what RQ's scheduler does at the job's resume time, without waiting for it."""
    queue = django_rq.get_queue(job.priority)
    assert job.rq_job_id in queue.scheduled_job_registry.get_job_ids()
    Job.objects.filter(pk=job.pk).update(resume_at=timezone.now())
    queue.enqueue_job(queue.fetch_job(job.rq_job_id))
    run_worker()


# A final failure fails the job or escalates it to review.
ENDED = {"failed", "needs_review"}


def http_statuses(job: Job) -> list[int | None]:
    """The HTTP status of each of the job's calls, in order."""
    return list(job.attempts.order_by("number").values_list("http_status", flat=True))


# --------------------------------------------------------------------------- processes


def start_process(args: list[str], ready_text: str, env: dict | None = None) -> subprocess.Popen:
    """Start a process and read its output until it prints `ready_text`."""
    process = subprocess.Popen(
        args,
        cwd=BASE_DIR,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if ready_text in line:
            return process
    process.kill()
    raise RuntimeError(f"{args} did not start:\n{''.join(seen)}")


def spawn(args: list[str], log_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a background process of the project; its output goes to a log file in log_dir."""
    log = open(log_dir / f"{Path(args[1]).stem}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        args, cwd=BASE_DIR, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def database_url() -> str:
    """The test database, as another process of the project is told it (DATABASE_URL)."""
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{database['NAME']}"
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


def worker_env(*, heartbeat: int, stale_after: int) -> dict:
    """A worker process's environment: this test's database and Redis, fast clocks."""
    return {
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "AIQUEUE_HEARTBEAT_INTERVAL": str(heartbeat),
        "AIQUEUE_STALE_RUNNING_AFTER": str(stale_after),
        "AIQUEUE_RECONCILE_INTERVAL": "1",
        "AIQUEUE_ENQUEUE_GRACE": "0",
        "PYTHONPATH": str(BASE_DIR),
    }


def start_worker(tmp_path: Path, *, threads: int, grace: int = 30, **env) -> subprocess.Popen:
    """`manage.py worker` as its own process (no scheduler), on this test's database."""
    environment = {
        **worker_env(heartbeat=1, stale_after=3),
        "AIQUEUE_WORKER_SHUTDOWN_GRACE": str(grace),
        **env,
    }
    return spawn(
        [sys.executable, "manage.py", "worker", "--no-scheduler", "--threads", str(threads)],
        tmp_path,
        environment,
    )


# --------------------------------------------------------------------------- ./run in a copy


def copy_app(tmp_path: Path) -> Path:
    """A copy of the repository in tmp_path/aiqueue, sharing this checkout's filled .venv."""
    copy = tmp_path / "aiqueue"
    shutil.copytree(BASE_DIR, copy, ignore=NOT_COPIED)
    (copy / ".venv").symlink_to(BASE_DIR / ".venv")
    return copy


def run_env(port: int, redis_port: int, sim_port: int) -> dict[str, str]:
    """This machine's environment minus everything the suite points elsewhere: the embedded
    defaults are what ./run is for."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIQUEUE_", "DJANGO_")) and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        PORT=str(port),
        AIQUEUE_REDIS_PORT=str(redis_port),
        AIQUEUE_SIMULATOR_PORT=str(sim_port),
        AIQUEUE_ADMIN_PASSWORD=RUN_ADMIN_PASSWORD,
        AIQUEUE_WORKERS="1",
        AIQUEUE_WORKER_THREADS="2",
    )
    return env


# --------------------------------------------------------------------------- pages and docs


class LabelledFields(HTMLParser):
    """The select and input fields inside the form with class `filters`, each with whether it
    has an accessible name (aria-label, or a <label for=its id>)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_filters = False
        self.fields: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.in_filters = "filters" in (attributes.get("class") or "").split()
        elif tag == "label" and attributes.get("for"):
            self.label_for.add(attributes["for"])
        elif self.in_filters and tag in ("select", "input", "textarea"):
            if attributes.get("type") != "hidden":
                self.fields.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.in_filters = False

    def unnamed(self) -> list[str]:
        return [
            str(field.get("name"))
            for field in self.fields
            if not field.get("aria-label") and field.get("id") not in self.label_for
        ]


def unnamed_filter_fields(html: str) -> list[str]:
    parser = LabelledFields()
    parser.feed(html)
    assert parser.fields, "no filter fields found"
    return parser.unnamed()


README = BASE_DIR / "README.md"


def documented_roles() -> dict[str, set[str]]:
    """The README's roles table: | role | group | permissions (`app.codename`, ...) |."""
    text = README.read_text()
    section = text[text.index("## Roles") :]
    roles = {}
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (group := re.fullmatch(r"`(\w+)` group", cells[1])):
            roles[group.group(1)] = set(re.findall(r"`(\w+\.\w+)`", cells[2]))
    return roles


# ----------------------------------------------------------------- websockets, breaker, caps

WS_ORIGIN = b"http://127.0.0.1:8000"


def session_cookie(client, user) -> bytes:
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def communicator(path: str, cookie: bytes | None = None, origin: bytes = WS_ORIGIN):
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie))
    from aiqueue.asgi import application  # Django must be set up first

    return WebsocketCommunicator(application, path, headers=headers)


def run(coroutine_function):
    """Run an async scenario on a new event loop with a channel layer of its own, and return
    what it returns.

    channels-redis keeps per-loop state on the layer object (the receive lock, bound to the
    first loop that waits on it, and the loop's connection pools). async_to_sync makes a new
    loop per call, so a layer shared with an earlier test's loop could fail this test's
    receive with "Lock ... is bound to a different event loop" (seen once in CI, depending on
    which tests ran before). A fresh layer per scenario shares nothing between tests.
    """
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    try:
        return async_to_sync(coroutine_function)()
    finally:
        channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


def make_probe_due(provider: Provider) -> None:
    """Skip the rest of the cooldown (30 s) by moving the probe time to now: no sleeping,
    and no race with a slow machine letting the cooldown pass too early."""
    key = breaker.KEY.format(provider=provider.pk)
    connection = django_rq.get_connection("default")
    seconds, micros = connection.time()
    connection.hset(key, "probe_at", seconds * 1000 + micros // 1000)


def occupy(resources) -> leases.Lease:
    """Take a slot as if some other run held it."""
    holder = SimpleNamespace(code="someone-else", priority="default", created_at=timezone.now())
    lease = leases.acquire(holder, resources)
    assert isinstance(lease, leases.Lease)
    return lease


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers with `statuses` in turn
    (then 200), `delay_s` after it came in (a slow receiver)."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0) -> None:
        self.statuses = list(statuses or [])
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body})
                time.sleep(delay_s)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
