"""Shared fixtures: the suite's Redis (see tests/redis_server.py), the simulator over real HTTP,
real workers, and plainly built objects."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import django_rq
import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import Group, Permission, User

from aiqueue.redis_server import free_port
from jobs.models import ModelPrice, Provider, Workload
from jobs.worker import build_worker

BASE_DIR = Path(__file__).resolve().parent.parent


class Simulator:
    """The simulated provider, running as its own process; `control()` switches its faults."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url

    def control(self, **config) -> dict:
        response = httpx.put(f"{self.url}/_control", json=config, timeout=5)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict:
        return httpx.get(f"{self.url}/_control", timeout=5).json()

    def counters(self) -> dict:
        return self.state()["counters"]

    def reset(self, **config) -> None:
        httpx.post(f"{self.url}/_control/reset", timeout=5).raise_for_status()
        if config:
            self.control(**config)


def pytest_collection_modifyitems(config, items) -> None:
    # Browser tests last: Playwright's sync API keeps an event loop on the main thread while its
    # session-wide browser lives, and async_to_sync refuses to run under it.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


def start_process(args: list[str], ready_text: str, env: dict | None = None) -> subprocess.Popen:
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


@pytest.fixture(autouse=True)
def fresh_dashboard_figures():
    """The dashboard shares its health figures for a few seconds (jobs.dashboard): no test may
    see another's."""
    from jobs import dashboard

    dashboard.forget_snapshots()


@pytest.fixture(scope="session")
def simulator_process():
    port = free_port()
    process = start_process(
        [
            sys.executable,
            "-m",
            "jobs.providers.simulator",
            "--port",
            str(port),
            "--latency-ms",
            "0",
        ],
        "listening",
    )
    yield Simulator(process, f"http://127.0.0.1:{port}")
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def simulator(simulator_process, settings):
    """The simulator with its faults and counters reset, at zero latency."""
    simulator_process.reset(latency_ms=0, stream_chunk_delay_ms=0)
    settings.AIQUEUE_SIMULATOR_URL = simulator_process.url
    return simulator_process


@pytest.fixture
def redis_conn():
    """The suite's Redis, emptied before each test that uses it."""
    connection = django_rq.get_connection("default")
    connection.flushdb()
    return connection


@pytest.fixture
def provider(db, simulator) -> Provider:
    provider = Provider.objects.create(
        name="Test simulator", kind=Provider.Kind.SIMULATED, base_url=f"{simulator.url}/v1"
    )
    ModelPrice.objects.create(
        provider=provider,
        model="sim-small",
        input_per_mtok=Decimal("1.00"),
        output_per_mtok=Decimal("2.00"),
    )
    return provider


@pytest.fixture
def workload(provider) -> Workload:
    return Workload.objects.create(
        name="Summaries",
        kind=Workload.Kind.SUMMARIZE,
        system_prompt="Summarize the text.",
        provider=provider,
        model="sim-small",
        max_output_tokens=200,
    )


@pytest.fixture
def user(db) -> User:
    return User.objects.create_user("alice", "alice@example.com", "pw-alice-123")


@pytest.fixture
def other_user(db) -> User:
    return User.objects.create_user("bob", "bob@example.com", "pw-bob-123")


@pytest.fixture
def operator(db) -> User:
    group, _ = Group.objects.get_or_create(name="Operators")
    group.permissions.add(
        *Permission.objects.filter(
            content_type__app_label="jobs", codename__in=["view_job", "change_job"]
        )
    )
    user = User.objects.create_user("olga", "olga@example.com", "pw-olga-123")
    user.groups.add(group)
    return user


@pytest.fixture
def user_client(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def run_worker(redis_conn):
    """Run the real worker code in this process until the queues are empty."""

    def run() -> None:
        build_worker(name=f"test-worker-{time.monotonic_ns()}").work(burst=True)

    return run


def queued_ids() -> list[str]:
    return [
        job_id
        for name in settings.RQ_QUEUE_NAMES
        for job_id in django_rq.get_queue(name).get_job_ids()
    ]
