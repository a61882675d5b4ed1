"""Shared start-up helpers for the benchmark scenarios in bench/.

Every scenario starts what it needs itself, as real subprocesses, in a temp directory, so it
runs from a fresh clone and never touches `var/` or port 6379. Typical use, in a script run
as `.venv/bin/python bench/<scenario>.py`:

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
    from bench.common import Stack, print_table, percentile

    with Stack(sim_latency_ms=1000) as stack:      # Redis + simulator + fresh SQLite DB, migrated
        stack.django()                            # this process can now use the ORM on that DB
        workload = stack.make_workload("Bench summaries", max_output_tokens=40)
        token = stack.api_token("bench")          # user + API token (Bearer key)
        web = stack.start_web(workers=1)          # uvicorn on a free port -> "http://127.0.0.1:P"
        stack.start_workers(1, threads=100)       # `manage.py worker --threads 100` processes
        stack.sim_control(error_rate=0.2)         # PUT /_control on the simulator
        stack.sim_counters()["requests_total"]
        stack.wait_until(lambda: ..., timeout=120)
    # leaving the block stops every process the stack started (SIGTERM, then SIGKILL) and
    # deletes the temp directory (pass keep=True to keep it and its logs).

What `Stack` gives you
    stack.tmp            temp directory (logs in stack.tmp / "log")
    stack.env            environment for subprocesses of the project (DATABASE_URL, REDIS_URL,
                         AIQUEUE_SIMULATOR_URL, AIQUEUE_VAR_DIR, PYTHONPATH, plus `env=` extras)
    stack.redis_url, stack.simulator_url, stack.database_url
    stack.spawn(name, args, env=None)  any subprocess (cwd = repo root, output to its log file);
                         it is stopped with the stack. Returns the Popen.
    stack.manage(*args)  run `manage.py <args>` to completion (raises on failure)
    stack.start_web(workers=1, settings_module=None, port=None)  uvicorn aiqueue.asgi
    stack.start_workers(n, threads=None, args=())  `manage.py worker` processes
    stack.stop_process(p, grace=10)  SIGTERM, wait, SIGKILL
    stack.kill_process(p)  SIGKILL at once to p and all its descendants (a crash)
    stack.check_alive()  raise if a process died by itself (wait_until calls it)
    stack.django()       point this process's Django at the stack (env vars + django.setup()).
                         Call it before importing any project module that touches settings.
    stack.make_workload(name, **fields), stack.user(), stack.api_token(), stack.login_client(url)
    stack.submit_jobs(workload, n) -> pks;  stack.run_span(pks) -> (succeeded, first start →
                         last finish in s);  stack.count_status(pks, status);  stack.rq_workers()

Module helpers: `pss_kib(pid)` (PSS of a process tree from /proc/<pid>/smaps_rollup),
`percentile(values, p)`, `print_table(headers, rows)`, `free_port()`, `REPO`, `PYTHON`.

Run any scenario on PostgreSQL with `BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432` in the
environment: the stack creates a database of its own there and drops it on close. Or pass
`database_url=` to use a database you create and drop yourself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aiqueue import redis_server  # noqa: E402
from aiqueue.redis_server import free_port  # noqa: E402

# Users the benchmarks create in their throw-away databases.
BENCH_PASSWORD = "bench-pw-" + "throwaway"

__all__ = [
    "PYTHON",
    "REPO",
    "Stack",
    "free_port",
    "percentile",
    "print_table",
    "pss_kib",
    "wait_port",
]


class Stack:
    """Redis, the simulator, a fresh database, and whatever web/worker processes you start."""

    def __init__(
        self,
        *,
        sim_latency_ms: int = 0,
        stream_chunk_delay_ms: int = 0,
        database_url: str | None = None,
        env: dict[str, str] | None = None,
        keep: bool = False,
        migrate: bool = True,
    ) -> None:
        self.sim_latency_ms = sim_latency_ms
        # 0 by default: a call takes `sim_latency_ms`, as the scenarios' ideals assume (the
        # simulator's own default pauses 20 ms between streamed chunks, ~0.3 s a call more).
        self.stream_chunk_delay_ms = stream_chunk_delay_ms
        self.keep = keep
        self._migrate = migrate
        self.tmp = Path(tempfile.mkdtemp(prefix="aiqb-"))
        self.log_dir = self.tmp / "log"
        self.log_dir.mkdir()
        # BENCH_POSTGRES=postgres://user@host:port runs any scenario on a fresh PostgreSQL
        # database of its own (created here, dropped on close) instead of a SQLite file.
        self._pg_server = os.environ.get("BENCH_POSTGRES", "") if database_url is None else ""
        if self._pg_server:
            database_url = f"{self._pg_server.rstrip('/')}/aiqb_{os.getpid()}"
        self.database_url = database_url or f"sqlite:///{self.tmp / 'bench.sqlite3'}"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.simulator_port = free_port()
        self.simulator_url = f"http://127.0.0.1:{self.simulator_port}"
        self.env: dict[str, str] = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "AIQUEUE_SIMULATOR_URL": self.simulator_url,
            "AIQUEUE_VAR_DIR": str(self.tmp / "var"),
            "AIQUEUE_SECRET_KEY": "bench-only-secret-key-not-for-production",
            "AIQUEUE_LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "aiqueue.settings",
            "PYTHONPATH": str(REPO),
            # Threaded workers on PostgreSQL share a psycopg pool (runs.dbconn).
            **({"AIQUEUE_DB_POOL": "1"} if self._pg_server else {}),
            **(env or {}),
        }
        self.processes: list[subprocess.Popen] = []
        self._stopped: set[int] = set()
        self._redis: subprocess.Popen | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pg_admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(f"{self._pg_server.rstrip('/')}/postgres", autocommit=True) as conn:
            conn.execute(statement)

    def start(self) -> None:
        if self._pg_server:
            name = self.database_url.rsplit("/", 1)[1]
            self._pg_admin(f'DROP DATABASE IF EXISTS "{name}"')
            self._pg_admin(f'CREATE DATABASE "{name}"')
        self._redis = redis_server.start(self.redis_port, self.tmp / "redis")
        self.spawn(
            "simulator",
            [PYTHON, "-m", "simulator", "--host", "127.0.0.1",
             "--port", str(self.simulator_port), "--latency-ms", str(self.sim_latency_ms)],
        )  # fmt: skip
        wait_port(self.simulator_port)
        self.sim_control(stream_chunk_delay_ms=self.stream_chunk_delay_ms)
        if self._migrate:
            self.manage("migrate", "--noinput", "-v", "0")

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_process(process)
        self.processes.clear()
        if self._redis is not None and self._redis.poll() is None:
            self._redis.terminate()
            self._redis.wait(timeout=10)
        if self._pg_server:
            from django.db import connections

            connections.close_all()
            self._pg_admin(f'DROP DATABASE IF EXISTS "{self.database_url.rsplit("/", 1)[1]}"')
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"(kept {self.tmp})", file=sys.stderr)

    # --- processes ---------------------------------------------------------------------------
    def spawn(
        self, name: str, args: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}-{len(self.processes)}.log"
        log = open(log_path, "w")  # noqa: SIM115
        process = subprocess.Popen(
            list(args),
            cwd=REPO,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: children stop with it
        )
        process.log_path = log_path  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def start_web(
        self,
        *,
        workers: int = 1,
        settings_module: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        app: str = "aiqueue.asgi:application",
        interface: str = "auto",
    ) -> str:
        """uvicorn serving `app` (aiqueue.asgi by default; interface "wsgi" for a WSGI app, run
        by uvicorn in its pool of 10 threads); returns its base URL once it accepts connections."""
        port = port or free_port()
        extra = dict(env or {})
        if settings_module:
            extra["DJANGO_SETTINGS_MODULE"] = settings_module
        self.spawn(
            "web",
            [PYTHON, "-m", "uvicorn", app, "--interface", interface, "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(workers), "--no-access-log",
             "--timeout-graceful-shutdown", "5"],
            env=extra,
        )  # fmt: skip
        wait_port(port, timeout=30)
        return f"http://127.0.0.1:{port}"

    def start_gunicorn(
        self, app: str, *, workers: int, threads: int, settings_module: str | None = None
    ) -> str:
        """gunicorn's gthread workers serving the WSGI `app`; returns its base URL."""
        port = free_port()
        extra = {"DJANGO_SETTINGS_MODULE": settings_module} if settings_module else {}
        self.spawn(
            "gunicorn",
            [PYTHON, "-m", "gunicorn", "-k", "gthread", "-w", str(workers), "--threads",
             str(threads), "-b", f"127.0.0.1:{port}", "--timeout", "120", app],
            env=extra,
        )  # fmt: skip
        wait_port(port, timeout=30)
        return f"http://127.0.0.1:{port}"

    def start_workers(
        self,
        n: int = 1,
        *,
        threads: int | None = None,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> list[subprocess.Popen]:
        """`manage.py worker` × n (threads=None: the command's default)."""
        started = []
        for i in range(n):
            cmd = [PYTHON, "manage.py", "worker", "--name", f"bench-{os.getpid()}-{i}"]
            if threads is not None:
                cmd += ["--threads", str(threads)]
            cmd += list(args)
            started.append(self.spawn(f"worker-{i}", cmd, env=env))
        return started

    def stop_process(self, process: subprocess.Popen, grace: float = 10) -> None:
        """SIGTERM to the process's group, then SIGKILL to its whole tree after `grace` s."""
        self._stopped.add(process.pid)
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill_process(process)

    def kill_process(self, process: subprocess.Popen) -> None:
        """SIGKILL the process and every descendant, including those in process groups of
        their own (RQ's work horses call setpgrp)."""
        self._stopped.add(process.pid)
        for pid in [*descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    # --- the simulator -----------------------------------------------------------------------
    def sim_control(self, **config: Any) -> dict:
        response = httpx.put(f"{self.simulator_url}/_control", json=config, timeout=5)
        response.raise_for_status()
        return response.json()

    def sim_reset_counters(self) -> None:
        self.sim_control(reset_counters=True)

    def sim_counters(self) -> dict:
        return httpx.get(f"{self.simulator_url}/_control", timeout=5).json()["counters"]

    # --- Django in this process --------------------------------------------------------------
    def django(self) -> None:
        """Point this process's Django at the stack's database and Redis, then set it up."""
        for key in ("DATABASE_URL", "REDIS_URL", "AIQUEUE_SIMULATOR_URL", "AIQUEUE_VAR_DIR",
                    "AIQUEUE_SECRET_KEY", "AIQUEUE_LOG_LEVEL"):  # fmt: skip
            os.environ[key] = self.env[key]
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")
        import django

        django.setup()

    def make_workload(self, name: str = "Bench summaries", **fields: Any):
        """A summarize workload on the simulator provider (call `django()` first)."""
        from decimal import Decimal

        from jobs.models import ModelPrice, Provider, Workload

        provider, _ = Provider.objects.get_or_create(
            name="Simulator", defaults={"kind": Provider.Kind.SIMULATED, "read_timeout_s": 60.0}
        )
        ModelPrice.objects.get_or_create(
            provider=provider,
            model="sim-small",
            defaults={"input_per_mtok": Decimal("0.50"), "output_per_mtok": Decimal("1.50")},
        )
        defaults = {
            "kind": Workload.Kind.SUMMARIZE,
            "system_prompt": "Summarize the text.",
            "provider": provider,
            "model": "sim-small",
            "max_output_tokens": 40,
            **fields,
        }
        workload, _ = Workload.objects.update_or_create(name=name, defaults=defaults)
        return workload

    def user(
        self, username: str = "bench", *, superuser: bool = True, password: str = BENCH_PASSWORD
    ):
        from django.contrib.auth.models import User

        user = User.objects.filter(username=username).first()
        if user is None:
            make = User.objects.create_superuser if superuser else User.objects.create_user
            user = make(username, f"{username}@localhost", password)
        return user

    def api_token(self, username: str = "bench") -> str:
        """A fresh API key for `username` (created if needed); send it as `Bearer <key>`."""
        from jobs.models import ApiToken

        token = ApiToken(user=self.user(username), name="bench")
        key = token.set_new_key()
        token.save()
        return key

    def login_client(
        self, base_url: str, username: str = "bench", password: str = BENCH_PASSWORD, **kwargs: Any
    ) -> httpx.Client:
        """An httpx client logged in through the login form (session cookie + CSRF)."""
        self.user(username, password=password)
        client = httpx.Client(base_url=base_url, follow_redirects=False, **kwargs)
        client.get("/accounts/login/")
        csrf = client.cookies.get("csrftoken", "")
        response = client.post(
            "/accounts/login/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": base_url + "/accounts/login/"},
        )
        if response.status_code != 302:
            raise RuntimeError(f"login failed: {response.status_code}")
        return client

    def submit_jobs(self, workload, n: int, *, user=None, prefix: str = "bench") -> list[int]:
        """Submit n jobs in this process (do_submit_job: row, event, enqueue on commit);
        returns their pks. Faster than the API when the API is not what is measured."""
        from jobs import services

        user = user or self.user()
        return [
            services.do_submit_job(
                workload=workload, input_text=f"{prefix} text number {i}", user=user
            )[0].pk
            for i in range(n)
        ]

    @staticmethod
    def run_span(pks: list[int]) -> tuple[int, float]:
        """(succeeded count, seconds from the first start to the last finish) of these jobs."""
        from django.db.models import Max, Min

        from jobs.models import Job

        jobs = Job.objects.filter(pk__in=pks)
        span = jobs.aggregate(first=Min("started_at"), last=Max("finished_at"))
        done = jobs.filter(status=Job.Status.SUCCEEDED).count()
        if span["first"] is None or span["last"] is None:
            return done, float("nan")
        return done, (span["last"] - span["first"]).total_seconds()

    def count_status(self, pks: list[int], status: str) -> int:
        from jobs.models import Job

        return Job.objects.filter(pk__in=pks, status=status).count()

    def rq_workers(self) -> int:
        """RQ workers registered on the stack's Redis (alive and announced)."""
        import redis
        from rq import Worker

        return Worker.count(connection=redis.Redis.from_url(self.redis_url))

    # --- waiting -----------------------------------------------------------------------------
    def wait_until(
        self, predicate: Callable[[], bool], timeout: float, interval: float = 0.2
    ) -> float:
        """Poll until predicate() is true; returns the seconds waited. Raises TimeoutError, or
        RuntimeError as soon as a process of the stack has died (see its log)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate():
                return time.monotonic() - start
            self.check_alive()
            time.sleep(interval)
        raise TimeoutError(f"condition not met within {timeout} s")

    def check_alive(self) -> None:
        """Raise RuntimeError naming the log of any stack process that exited by itself."""
        for process in self.processes:
            if process.poll() is not None and process.pid not in self._stopped:
                log = getattr(process, "log_path", "?")
                tail = Path(log).read_text()[-2000:] if log != "?" else ""
                raise RuntimeError(f"{process.args[:4]} exited ({process.returncode}):\n{tail}")


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children first found, grandchildren after)."""
    found: list[int] = []
    pending = _children(pid)
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        pending += _children(current)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its live descendants, in seconds (a process's exited threads
    included; exited child processes not)."""
    total = 0
    for one in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int, *, tree: bool = True) -> int:
    """Proportional set size (KiB) of a process, and with tree=True of all its descendants.

    PSS splits shared pages between the processes that map them, so summing it over a process
    tree does not double-count what forked children share with their parent.
    """
    total = 0
    pending = [pid]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
        if tree:
            pending += _children(current)
    return total


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> None:
    """A plain aligned table (also valid Markdown), so docs/benchmarks.md can quote it."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)
