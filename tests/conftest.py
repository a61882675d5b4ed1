"""Shared fixtures: the suite's Redis (see tests/redis_server.py), the simulator over real HTTP,
real workers, and plainly built objects."""

from __future__ import annotations

import subprocess
import sys
import time

import django_rq
import httpx
import pytest
from django.contrib.auth.models import User
from django.db import connection

from aiqueue.redis_server import free_port
from jobs.models import Provider, Workload
from runs import dbconn
from runs import worker as worker_module
from runs.worker import build_worker
from tests import factories
from tests.helpers import Receiver, run_on_commit_callbacks, start_process

REVIEW_LABELS = ["spam", "ham"]


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


def pytest_configure(config) -> None:
    # Before any test hashes a password (tests/hashers.py: ~0.3 s of CPU per stock hash).
    from django.conf import settings
    from django.db.models.signals import post_migrate

    settings.PASSWORD_HASHERS = ["tests.hashers.OneIterationPBKDF2PasswordHasher"]
    post_migrate.connect(put_back_data_migration_rows, dispatch_uid="tests-data-migration-rows")


# The rows data migrations create: the documented groups.
DATA_MIGRATIONS = (
    "jobs.migrations.0010_i18_operators_group",
    "review.migrations.0002_reviewers_group",
)


def put_back_data_migration_rows(sender, using="default", **kwargs) -> None:
    """A transactional test ends with a flush, which empties every table, the rows of data
    migrations too, and then sends post_migrate (Django recreates content types and
    permissions then). Put the groups back as well, from their migrations' own GROUP and
    PERMISSIONS, so the next test on this xdist worker finds the database as `migrate` left
    it, whichever kind of test ran before it."""
    import importlib

    from django.contrib.auth.models import Group, Permission

    if sender.label != "review" or Group.objects.using(using).exists():
        return  # once per flush (post_migrate is sent per app, review's last), only after one
    for name in DATA_MIGRATIONS:
        migration = importlib.import_module(name)
        group = Group.objects.using(using).create(name=migration.GROUP)
        for app_label, codename in migration.PERMISSIONS:
            group.permissions.add(
                Permission.objects.using(using).get(
                    content_type__app_label=app_label, codename=codename
                )
            )


# The longest groups of tests, each kept on one xdist worker (`--dist loadgroup`, see ./test):
# fault tests each start a whole ./run, browser tests share one chromium per worker, and RQ's
# own suite is one long test.
XDIST_GROUPS = ("faults", "browser", "rq_suite")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        for name in XDIST_GROUPS:
            if item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.xdist_group(name))

    # Those groups first. pytest-django then sorts (stably) rolled-back tests before
    # transactional ones, as Django does, since a flush removes the data migrations' rows: so
    # the groups start as the workers reach the transactional tests, and the rest of those fill
    # the other workers meanwhile. Browser tests run in a row: Playwright's sync API keeps an
    # event loop on the main thread while chromium lives (tests/browser/conftest.py), and
    # async_to_sync refuses to run under it.
    def rank(item) -> int:
        for position, name in enumerate(XDIST_GROUPS):
            if item.get_closest_marker(name) is not None:
                return position
        return len(XDIST_GROUPS)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def live_groups_asked_at_every_publish(settings):
    """In the test process a live group is asked about at every publish: tests join a group
    right after a publish found it empty, within the second that answer would be kept. The
    processes tests start keep the default, which the browser tests go through, and
    tests/jobs/test_live.py tests the cache itself."""
    from jobs import live

    settings.AIQUEUE_LIVE_UNWATCHED_CACHE_MS = 0
    live.forget_unwatched()


@pytest.fixture(autouse=True)
def fresh_dashboard_figures():
    """The dashboard shares its health figures for a few seconds (ops.dashboard): no test may
    see another's."""
    from ops import dashboard

    dashboard.forget_snapshots()


@pytest.fixture(scope="session")
def simulator_process():
    port = free_port()
    process = start_process(
        [
            sys.executable,
            "-m",
            "simulator",
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
    return factories.make_provider(f"{simulator.url}/v1")


@pytest.fixture
def workload(provider) -> Workload:
    return factories.make_workload(
        provider,
        name="Summaries",
        system_prompt="Summarize the text.",
        max_output_tokens=200,
    )


@pytest.fixture
def classify_workload(provider) -> Workload:
    """Escalates an answer below 0.5 confidence to the review inbox."""
    return factories.make_workload(
        provider,
        Workload.Kind.CLASSIFY,
        name="Spam filter",
        system_prompt="Classify the message.\nLabels: " + ", ".join(REVIEW_LABELS),
        labels=REVIEW_LABELS,
        confidence_threshold=0.5,
        max_output_tokens=5,
    )


@pytest.fixture
def extract_workload(provider) -> Workload:
    return factories.make_workload(
        provider,
        Workload.Kind.EXTRACT,
        name="Invoice fields",
        system_prompt="Extract the invoice fields as JSON.",
        max_output_tokens=200,
    )


@pytest.fixture
def user(db) -> User:
    return factories.make_user("alice")


@pytest.fixture
def other_user(db) -> User:
    return factories.make_user("bob")


@pytest.fixture
def operator(db) -> User:
    return factories.make_user("olga", role="operator")


@pytest.fixture
def reviewer(db) -> User:
    return factories.make_user("rita", role="reviewer")


@pytest.fixture
def second_reviewer(db) -> User:
    return factories.make_user("ravi", role="reviewer")


@pytest.fixture
def reader(db) -> User:
    """Someone who may look at the inbox (view permission) but is not a reviewer."""
    return factories.make_user("rob", role="reader")


@pytest.fixture
def token(user) -> str:
    """An API token of `user`."""
    return factories.make_token(user)


@pytest.fixture
def user_client(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def run_worker(redis_conn, monkeypatch):
    """Run the real worker code in this process until the queues are empty.

    In a test that rolls back (plain `django_db`) nothing ever commits, so the worker runs as if
    each transaction had: the on-commit callbacks pending (a submit enqueues its job that way)
    run first, those the run registers run after it, and the worker runs again while they queue
    more. Between jobs the worker keeps the test's connection: closing it, as
    `close_old_connections()` does to a connection inside a transaction, would end the test's
    transaction (Django's test client skips the same call for the same reason)."""

    def burst() -> None:
        build_worker(name=f"test-worker-{time.monotonic_ns()}", inline=True).work(burst=True)

    def run() -> None:
        if not connection.in_atomic_block:
            burst()
            return
        monkeypatch.setattr(worker_module, "close_old_connections", lambda: None)
        monkeypatch.setattr(dbconn, "close_old_connections", lambda: None)
        run_on_commit_callbacks()
        while True:
            burst()
            if not run_on_commit_callbacks():
                return

    return run


@pytest.fixture
def touchy(workload):
    """The workload's provider opens its breaker after 2 consecutive failures; one successful
    probe closes it."""
    provider = workload.provider
    provider.breaker_failure_threshold = 2
    provider.breaker_cooldown_s = 30
    provider.breaker_probe_successes = 1
    provider.save()
    return provider


@pytest.fixture
def receiver():
    """make(statuses, delay_s) -> a Receiver (tests.helpers) on localhost, closed after the
    test."""
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None, delay_s: float = 0) -> Receiver:
        made.append(Receiver(statuses, delay_s))
        return made[-1]

    yield make
    for each in made:
        each.close()
