"""submit: web-process CPU per API submission, and open-loop accept latency, per HTTP server.

    .venv/bin/python bench/submit.py [--submissions 2000] [--senders 8] [--rate 200]
                                     [--servers uvicorn-asgi,granian-asgi,...] [--no-count]
                                     [--profile granian-wsgi,gunicorn-gthread] [--quick] [--keep]

The issue "a lean submit path" asks for <= 2 ms of web-process CPU per POST /api/jobs and, with
open-loop arrivals at 200/s, an accept p50 <= 10 ms, p99 <= 50 ms and no errors. One run starts
the real stack (Redis, the simulator, a fresh SQLite database; BENCH_POSTGRES=... runs it on
PostgreSQL, see bench/common.py), and then, one server at a time (one process each, so the
numbers compare), serves the same project code and measures:

1. CPU per submission, closed loop: --senders connections (keep-alive) each send their next
   submission when the last was answered, --submissions in all. The CPU is utime + stime
   (/proc/<pid>/stat, which counts exited threads too) of the server's whole process tree
   during the burst, divided by the submissions accepted (202). This is the headline number:
   it does not depend on what else runs on the machine. "idle" is the tree's CPU over 2 s with
   no requests (timers, heartbeats), for reference; it is not subtracted.
2. Open loop: --submissions arrivals at --rate per second (Poisson, seeded), each sent at its
   scheduled time on a connection of its own from an idle pool (a new one if none is idle), by
   an asyncio client with a hand-written HTTP/1.1 exchange (a few tens of µs of client CPU per
   request, so the sender is not the bottleneck; "send lag p99" shows how late it sent). The
   latency is from the scheduled send time to the whole answer, so a server that falls behind
   is charged for the wait too (no coordinated omission). Errors are answers other than 202,
   broken connections and timeouts (10 s).
3. Counting pass (unless --no-count): each server again, serving bench/submit_counting.py's
   wrapped app, for --count-submissions submissions: SQL statements per submission (by first
   word; COMMIT is not a statement Django executes and is not counted), database connections
   opened per submission, and the number of distinct threads that ran request code. Redis
   commands per submission come from pass 1 (INFO commandstats before and after the burst).

No worker runs: submissions are just queued (row, event, RQ job); the queue grows through the
run. Between servers the job rows are deleted and Redis is flushed, so each starts alike.

Servers (--servers, comma-separated; all by default):
  uvicorn-django-asgi  uvicorn, HTTP through Django's own ASGI handler (bench/django_asgi.py:
                    as deployed before aiqueue/asgi.py bridged to the WSGI handler)
  uvicorn-asgi      uvicorn aiqueue.asgi:application, uvloop + httptools (as ./run serves it)
  granian-asgi      granian --interface asginl (ASGI, no lifespan) aiqueue.asgi:application
  granian-wsgi      granian --interface wsgi --blocking-threads 8 aiqueue.wsgi:application
  gunicorn-gthread  gunicorn -k gthread -w 1 --threads 8 aiqueue.wsgi:application
  uvicorn-wsgi      uvicorn --interface wsgi aiqueue.wsgi:application (its pool of 10 threads)
granian is not in the project's lock files (gunicorn is, in requirements-dev.lock): `pip install
granian` (and `py-spy` for --profile) into the venv to measure it; a server not installed is
skipped.

--profile A,B: after the measurements, py-spy samples (200/s, native frames, idle threads off)
each named server's tree during another closed-loop burst, and prints where the samples are:
by the innermost part of the request they fall in (server, each middleware, auth, validation,
submit service, enqueue, response) and by what runs there (SQL driver, ORM compile, redis-py,
...). A sample whose thread is waiting (GIL, lock, poll, futex, disk) is left out; "ms/sub"
scales a share to the CPU per submission measured in pass 1. py-spy pauses the process to
sample, so the profile pass is not timed.
--quick: 300 submissions (and 150 in the counting pass).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    PYTHON,
    Stack,
    cpu_seconds,
    descendants,
    free_port,
    percentile,
    print_table,
    wait_port,
)

BIN = Path(PYTHON).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/api/jobs"
TIMEOUT_S = 10.0


# --- the servers ------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    kind: str  # "asgi" or "wsgi": which app it serves
    needs: str  # executable in the venv's bin (or "" for python -m uvicorn)
    threads: str  # what runs the view code, for the table

    def command(self, app: str, port: int) -> list[str]:
        host = ["--host", "127.0.0.1", "--port", str(port)]
        if self.name in ("uvicorn-asgi", "uvicorn-django-asgi"):
            return [PYTHON, "-m", "uvicorn", app, *host, "--loop", "uvloop", "--http",
                    "httptools", "--workers", "1", "--no-access-log",
                    "--timeout-graceful-shutdown", "5"]  # fmt: skip
        if self.name == "uvicorn-wsgi":
            return [PYTHON, "-m", "uvicorn", app, "--interface", "wsgi", *host, "--loop",
                    "uvloop", "--http", "httptools", "--workers", "1", "--no-access-log",
                    "--timeout-graceful-shutdown", "5"]  # fmt: skip
        if self.name == "granian-asgi":
            return [str(BIN / "granian"), "--interface", "asginl", *host, "--workers", "1",
                    "--loop", "uvloop", "--no-ws", "--log-level", "warning", app]  # fmt: skip
        if self.name == "granian-wsgi":
            return [str(BIN / "granian"), "--interface", "wsgi", *host, "--workers", "1",
                    "--blocking-threads", "8", "--no-ws", "--log-level", "warning",
                    app]  # fmt: skip
        if self.name == "gunicorn-gthread":
            return [str(BIN / "gunicorn"), "-k", "gthread", "-w", "1", "--threads", "8",
                    "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                    "--graceful-timeout", "5", app]  # fmt: skip
        raise ValueError(self.name)

    def installed(self) -> bool:
        return not self.needs or (BIN / self.needs).exists()


SERVERS = {
    s.name: s
    for s in (
        Server("uvicorn-django-asgi", "django-asgi", "", "1 thread per request (asgiref)"),
        Server("uvicorn-asgi", "asgi", "", "8 pool threads (a2wsgi)"),
        Server("granian-asgi", "asgi", "granian", "8 pool threads (a2wsgi)"),
        Server("granian-wsgi", "wsgi", "granian", "8 blocking threads"),
        Server("gunicorn-gthread", "wsgi", "gunicorn", "8 threads"),
        Server("uvicorn-wsgi", "wsgi", "", "10 pool threads"),
    )
}
APPS = {
    "asgi": "aiqueue.asgi:application",
    "django-asgi": "bench.django_asgi:application",
    "wsgi": "aiqueue.wsgi:application",
}
COUNTING_APPS = {
    "asgi": "bench.submit_counting:asgi",
    "django-asgi": "bench.submit_counting:django_asgi",
    "wsgi": "bench.submit_counting:wsgi",
}


# --- the process tree's CPU -------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def thread_cpu_s(pid: int) -> dict[tuple[int, int], float]:
    """{(process, thread): utime + stime in s} for every live thread of the tree."""
    found = {}
    for p in tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                found[p, int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, IndexError, ValueError):
                continue
    return found


def split_by_thread(before: dict, after: dict, total: float) -> tuple[float, float, float]:
    """(main threads, other live threads, threads gone by the end) of `total` CPU s: a main
    thread is one whose id is its process's; exited threads are what the process total has
    that no live thread accounts for."""
    main = other = 0.0
    for (p, tid), value in after.items():
        delta = value - before.get((p, tid), 0.0)
        if tid == p:
            main += delta
        else:
            other += delta
    return main, other, max(0.0, total - main - other)


def thread_count(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        except (OSError, StopIteration):
            continue
    return total


# --- a lean HTTP/1.1 client -------------------------------------------------------------------
class Client:
    """Keep-alive connections to one server, exchanged by hand (no client library): a POST's
    bytes are formatted once per request, and the answer is read by its Content-Length (or
    chunked). Idle connections are reused; a request with none idle opens a new one."""

    def __init__(self, port: int, key: str, workload: str) -> None:
        self.port = port
        self.head = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Accept: application/json\r\n"
        )
        self.workload = workload
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    def payload(self, i: int) -> bytes:
        body = json.dumps({"workload": self.workload, "input": f"submit bench text {i}"}).encode()
        return f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def post(self, i: int) -> int:
        """One submission; returns the status (0: the connection broke)."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.opened += 1
        try:
            writer.write(self.payload(i))
            status, keep = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return 0
        if keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status

    async def get_json(self, path: str) -> dict:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read()
        writer.close()
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"GET {path}: {head[:80]!r}")
        return json.loads(body)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    keep = headers.get("connection") != "close" and lines[0].startswith("HTTP/1.1")
    return status, keep


async def timed_post(
    client: Client, i: int, since: float, latencies: list[float], errors: Counter
) -> None:
    """Submission `i`: its time from `since` to its 202 goes in `latencies`, else its error."""
    try:
        status = await asyncio.wait_for(client.post(i), TIMEOUT_S)
    except TimeoutError:
        errors["timeout"] += 1
        return
    if status == 202:
        latencies.append(time.perf_counter() - since)
    else:
        errors[str(status or "broken")] += 1


async def closed_loop(client: Client, n: int, senders: int, first: int) -> dict:
    latencies: list[float] = []
    errors = Counter()
    counter = iter(range(first, first + n))

    async def sender() -> None:
        while (i := next(counter, None)) is not None:
            await timed_post(client, i, time.perf_counter(), latencies, errors)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(senders)))
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - started}


async def open_loop(client: Client, n: int, rate: float, first: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    lags: list[float] = []
    errors = Counter()
    tasks = []

    async def one(i: int, due: float) -> None:
        lags.append(time.perf_counter() - due)
        await timed_post(client, i, due, latencies, errors)

    start = time.perf_counter() + 0.05
    due = start
    for i in range(first, first + n):
        due += rng.expovariate(rate)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    return {
        "latencies": latencies,
        "errors": errors,
        "lags": lags,
        "wall": time.perf_counter() - start,
    }


# --- Redis commands ---------------------------------------------------------------------------
def commandstats(redis_client) -> Counter:
    stats = redis_client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})


# --- one server -------------------------------------------------------------------------------
def start_server(stack: Stack, server: Server, app: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = stack.spawn(server.name, server.command(app, port))
    wait_port(port, timeout=60)
    return process, port


def reset_state(stack: Stack, redis_client) -> None:
    from jobs.models import Job

    Job.objects.all().delete()
    redis_client.flushdb()


def measure(stack: Stack, server: Server, key: str, workload: str, options, redis_client) -> dict:
    process, port = start_server(stack, server, APPS[server.kind])
    client = Client(port, key, workload)
    loop = asyncio.new_event_loop()
    try:
        warm = loop.run_until_complete(closed_loop(client, 100, options.senders, 0))
        if warm["errors"]:
            raise RuntimeError(f"{server.name}: warm-up errors {dict(warm['errors'])}; see "
                               f"{process.log_path}")  # type: ignore[attr-defined]  # fmt: skip
        # Idle keep-alive connections may be closed by the server (gunicorn after 2 s): the
        # measured bursts start on fresh ones.
        client.close()
        idle0 = cpu_seconds(process.pid)
        time.sleep(2.0)
        idle = (cpu_seconds(process.pid) - idle0) / 2.0
        redis0 = commandstats(redis_client)
        cpu0, threads0 = cpu_seconds(process.pid), thread_cpu_s(process.pid)
        closed = loop.run_until_complete(
            closed_loop(client, options.submissions, options.senders, 10_000)
        )
        closed_cpu = cpu_seconds(process.pid) - cpu0
        by_thread = split_by_thread(threads0, thread_cpu_s(process.pid), closed_cpu)
        redis1 = commandstats(redis_client)
        threads_closed = thread_count(process.pid)
        client.close()
        time.sleep(1.0)
        cpu0 = cpu_seconds(process.pid)
        opened_before = client.opened
        open_ = loop.run_until_complete(
            open_loop(client, options.submissions, options.rate, 100_000)
        )
        open_cpu = cpu_seconds(process.pid) - cpu0
        threads_open = thread_count(process.pid)
        client.close()
    finally:
        loop.close()
        stack.stop_process(process, grace=5)
    redis_calls = redis1 - redis0
    redis_calls.pop("info", None)
    accepted = len(closed["latencies"])
    return {
        "server": server,
        "closed": closed,
        "open": open_,
        "cpu_ms": 1000 * closed_cpu / max(1, accepted),
        "by_thread_ms": [1000 * t / max(1, accepted) for t in by_thread],
        "open_cpu_ms": 1000 * open_cpu / max(1, len(open_["latencies"])),
        "open_cores": open_cpu / open_["wall"],
        "idle_ms_per_s": 1000 * idle,
        "redis": redis_calls,
        "redis_per_sub": sum(redis_calls.values()) / max(1, accepted),
        "threads": max(threads_closed, threads_open),
        "open_connections": client.opened - opened_before,
    }


def count(
    stack: Stack, server: Server, key: str, workload: str, n: int, senders: int, trace: bool
) -> dict:
    """The counting pass for one server; with `trace`, one more submission alone, whose SQL
    statements and Redis commands (redis-cli MONITOR) are listed."""
    process, port = start_server(stack, server, COUNTING_APPS[server.kind])
    client = Client(port, key, workload)
    loop = asyncio.new_event_loop()
    statements_one: list[str] = []
    commands_one: list[str] = []
    try:
        loop.run_until_complete(closed_loop(client, 20, senders, 0))
        before = loop.run_until_complete(client.get_json("/_bench/counts"))
        burst = loop.run_until_complete(closed_loop(client, n, senders, 10_000))
        after = loop.run_until_complete(client.get_json("/_bench/counts"))
        cli = shutil.which("redis-cli")
        if trace and cli:
            monitor = subprocess.Popen(
                [cli, "-p", str(stack.redis_port), "monitor"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            time.sleep(0.5)
            loop.run_until_complete(closed_loop(client, 1, 1, 50_000))
            time.sleep(0.5)
            monitor.terminate()
            out, _ = monitor.communicate(timeout=10)
            commands_one = [line.split("] ", 1)[-1][:150] for line in out.splitlines()[1:]]
            statements_one = loop.run_until_complete(client.get_json("/_bench/counts"))["last"]
        client.close()
    finally:
        loop.close()
        stack.stop_process(process, grace=5)
    accepted = len(burst["latencies"])
    statements = Counter(after["statements"])
    statements.subtract(before["statements"])
    return {
        "accepted": accepted,
        "statements": {k: v / accepted for k, v in statements.items() if v},
        "sql_per_sub": sum(statements.values()) / accepted,
        "connections_per_sub": (after["connections"] - before["connections"]) / accepted,
        "threads_used": after["threads"],
        "statements_one": statements_one,
        "commands_one": commands_one,
    }


def connection_open_cost(n: int = 200) -> float:
    """CPU ms to open (and close) one connection to the stack's database in this process, as
    Django does for a thread with none: the driver's connect plus the settings' PRAGMAs."""
    from django.db import connection

    connection.ensure_connection()
    started = time.process_time()
    for _ in range(n):
        connection.close()
        connection.ensure_connection()
    return 1000 * (time.process_time() - started) / n


# --- profile ----------------------------------------------------------------------------------
# Innermost first: a sample is put in the first bucket, walking from its leaf to its root,
# whose pattern matches a frame ("function (file:line)", full file names).
WHERE = [
    ("RQ enqueue (jobs.queueing, rq)", r"/jobs/queueing\.py|/site-packages/rq/"),
    ("live publish (jobs.live)", r"/jobs/live[a-z_]*\.py"),
    ("budgets.reserve_for", r"/jobs/flow/budgets\.py"),
    ("backpressure.check", r"/jobs/flow/backpressure\.py"),
    ("on_commit callbacks (transaction)", r"run_and_clear_commit_hooks|run_commit_hooks_on_set"),
    ("do_submit_job (row, event, atomic)", r"do_submit_job \("),
    ("JSON response (job_json, JsonResponse)", r"job_answer \(|job_json \(|JsonResponse"),
    ("workload lookup (_workload)", r"_workload \("),
    (
        "body: json_body + field checks",
        r"json_body \(|_job_input \(|_idempotency_key \("
        r"|_priority \(|_parse_time \(",
    ),
    ("auth: token lookup (api_auth)", r"wrapped \(.*/jobs/api\.py"),
    ("view rest (jobs.api)", r"/jobs/api\.py"),
    ("mw: SecurityMiddleware", r"/django/middleware/security\.py"),
    ("mw: ContentSecurityPolicy", r"/aiqueue/middleware\.py"),
    ("mw: WhiteNoise", r"/whitenoise/"),
    ("mw: Session", r"/django/contrib/sessions/"),
    ("mw: Common", r"/django/middleware/common\.py"),
    ("mw: Csrf", r"/django/middleware/csrf\.py"),
    ("mw: Authentication/LoginRequired", r"/django/contrib/auth/middleware\.py"),
    ("mw: Messages", r"/django/contrib/messages/"),
    ("mw: XFrameOptions", r"/django/middleware/clickjacking\.py"),
    ("mw: Htmx", r"/django_htmx/"),
    ("Django: URL resolve", r"/django/urls/"),
    ("Django: request/response objects", r"/django/http/"),
    ("Django: signals (request_started/finished)", r"/django/dispatch/"),
    ("Django: handler (base, wsgi/asgi)", r"/django/core/handlers/"),
    ("asgiref (sync_to_async hops, threads)", r"/asgiref/"),
    ("channels routing / bulkhead", r"/channels/|/aiqueue/bulkhead\.py"),
    ("server: uvicorn", r"/uvicorn/"),
    ("server: granian", r"/granian/|granian"),
    ("server: gunicorn", r"/gunicorn/"),
    ("server: uvloop/asyncio", r"uvloop|/asyncio/"),
    ("thread pools (threading, concurrent.futures)", r"/threading\.py|/concurrent/futures/"),
]
WHAT = [
    (
        "SQL: SQLite / psycopg (native driver)",
        r"libsqlite|_sqlite|sqlite3[A-Z_]|/sqlite3/dbapi2|cursor\.c|psycopg",
    ),
    ("SQL: Django backend (cursor, execute)", r"/django/db/backends/"),
    ("ORM: SQL compile", r"/django/db/models/sql/"),
    ("ORM: models, querysets, fields", r"/django/db/"),
    ("Redis: redis-py, hiredis", r"/site-packages/redis/|hiredis"),
    ("RQ (job build, pickle, zlib)", r"/site-packages/rq/|zlib|pickle"),
    (
        "syscalls (socket, file I/O)",
        r"^(__libc_)?(send|recv|sendto|recvfrom|sendmsg|recvmsg|write|writev|read|pread64"
        r"|pwrite64|close|getpid|unlink|sched_yield) \(|socketmodule\.c|selectmodule\.c",
    ),
    ("json", r"/json/|_json\.c"),
    ("Django: other", r"/django/"),
    ("asgiref", r"/asgiref/"),
    (
        "HTTP server (uvicorn, granian, gunicorn, httptools, uvloop, asyncio)",
        r"/uvicorn/|granian|/gunicorn/|httptools|uvloop|/asyncio/",
    ),
    ("threading / futures", r"/threading\.py|/concurrent/futures/|/queue\.py"),
    ("project code", r"/aiqueue/|/jobs/|/runs/|/ops/"),
]
# A sample whose last frames are one of these is a thread waiting, not running: for the GIL
# (take_gil's condition wait), a lock, a poll, a futex (the "syscall" of Rust threads), a sleep
# or the disk (fdatasync). py-spy's own idle test misses most of them with native frames.
WAITING = re.compile(
    r"^(pthread_cond_(timed)?wait|PyThread_acquire_lock_timed|take_gil|sem_(timed)?wait"
    r"|syscall|poll|epoll_wait|epoll_pwait|select|clock_nanosleep|nanosleep|accept4?|fdatasync"
    r"|futex_wait|__futex_abstimed_wait\w*) \("
)


def waiting(frames: list[str]) -> bool:
    """A thread waiting, by its last frames; a leaf in libc that py-spy cannot name is one of
    its futex helpers (lock and condition waits) and counts as waiting too."""
    if not frames:
        return True
    if re.match(r"0x[0-9a-f]+ \(.*/libc\.so", frames[-1]):
        return True
    return any(WAITING.match(frame) for frame in frames[-3:])


def classify(frames: list[str], table: list[tuple[str, str]], compiled: dict) -> str:
    for frame in reversed(frames):  # leaf first
        for name, _ in table:
            if compiled[name].search(frame):
                return name
    return "other (stdlib, interpreter, GC)"


def profile(stack: Stack, server: Server, key: str, workload: str, options) -> dict:
    py_spy = BIN / "py-spy"
    out = stack.tmp / f"profile-{server.name}.txt"
    process, port = start_server(stack, server, APPS[server.kind])
    client = Client(port, key, workload)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(closed_loop(client, 100, options.senders, 0))
        client.close()
        spy = subprocess.Popen(
            [str(py_spy), "record", "--pid", str(process.pid), "--rate", "200", "--native",
             "--subprocesses", "--threads", "--full-filenames", "--format", "raw",
             "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.5)  # py-spy attaches
        burst = loop.run_until_complete(
            closed_loop(client, options.profile_submissions, options.senders, 10_000)
        )
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        client.close()
    finally:
        loop.close()
        stack.stop_process(process, grace=5)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-1000:]}")
    samples: list[tuple[list[str], int]] = []
    for line in out.read_text().splitlines():
        stack_text, _, n = line.rpartition(" ")
        if stack_text and n.isdigit():
            samples.append((stack_text.split(";"), int(n)))
    if options.keep:
        shutil.copy(out, stack.tmp / "log" / out.name)
    compiled = {name: re.compile(p) for name, p in WHERE + WHAT}
    where: Counter[str] = Counter()
    what: Counter[str] = Counter()
    cross: Counter[tuple[str, str]] = Counter()
    threads: Counter[str] = Counter()
    waits = 0
    for frames, n in samples:
        # The process and thread "frames" py-spy puts at the root name the server: not code.
        frames = [f for f in frames if not f.startswith(("process ", "thread ("))]
        if waiting(frames):
            waits += n
            continue
        w = classify(frames, WHERE, compiled)
        k = classify(frames, WHAT, compiled)
        where[w] += n
        what[k] += n
        cross[w, k] += n
        in_request = any("/django/" in f for f in frames)
        threads["Django code on the stack" if in_request else "no Django frame (server)"] += n
    return {
        "where": where,
        "what": what,
        "cross": cross,
        "threads": threads,
        "total": sum(n for _, n in samples) - waits,
        "waits": waits,
        "accepted": len(burst["latencies"]),
    }


def print_profile(name: str, result: dict, cpu_ms: float) -> None:
    """Percentages of the running samples; "ms/sub" scales them to the CPU per submission
    measured without the profiler (the closed-loop table)."""
    total = result["total"] or 1
    kinds = ["SQL: SQLite / psycopg (native driver)", "SQL: Django backend (cursor, execute)",
             "ORM: SQL compile", "ORM: models, querysets, fields",
             "Redis: redis-py, hiredis"]  # fmt: skip
    rows = []
    for bucket, n in result["where"].most_common():
        split = [100 * result["cross"][bucket, k] / total for k in kinds]
        rows.append(
            [
                bucket,
                f"{100 * n / total:.1f}",
                f"{cpu_ms * n / total:.2f}",
                *[f"{s:.1f}" if s else "" for s in split],
            ]
        )
    print_table(
        ["where (innermost part of the request)", "% samples", "ms/sub", "SQL driver %",
         "SQL backend %", "ORM compile %", "ORM other %", "Redis %"],
        rows,
        title=f"profile {name}: {result['total']} running samples (200/s; {result['waits']} "
        f"more were threads waiting: GIL, locks, poll, disk) over {result['accepted']} "
        "submissions",
    )  # fmt: skip
    print_table(
        ["what runs (leaf-most library)", "% samples", "ms/sub"],
        [
            [k, f"{100 * n / total:.1f}", f"{cpu_ms * n / total:.2f}"]
            for k, n in result["what"].most_common()
        ],
    )
    print_table(
        ["thread", "% samples"],
        [[k, f"{100 * n / total:.1f}"] for k, n in result["threads"].most_common()],
    )


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submissions", type=int, default=2000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--count-submissions", type=int, default=300)
    parser.add_argument("--no-count", action="store_true")
    parser.add_argument("--profile", default="", help="servers to profile with py-spy")
    parser.add_argument("--profile-submissions", type=int, default=1500)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    options = parser.parse_args()
    if options.quick:
        options.submissions, options.count_submissions = 300, 150
        options.profile_submissions = 500
    names = [n for n in options.servers.split(",") if n]
    unknown = [n for n in names + options.profile.split(",") if n and n not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {unknown}; known: {', '.join(SERVERS)}")
    servers = [SERVERS[n] for n in names]
    skipped = [s.name for s in servers if not s.installed()]
    servers = [s for s in servers if s.installed()]

    results, counts, profiles = [], {}, {}
    open_cost = float("nan")
    with Stack(sim_latency_ms=0, keep=options.keep) as stack:
        stack.django()
        import redis

        redis_client = redis.Redis.from_url(stack.redis_url)
        workload = stack.make_workload("Bench submit", max_output_tokens=40)
        key = stack.api_token()
        for server in servers:
            reset_state(stack, redis_client)
            results.append(measure(stack, server, key, workload.name, options, redis_client))
            print(f"  {server.name}: {results[-1]['cpu_ms']:.2f} ms CPU per submission",
                  file=sys.stderr)  # fmt: skip
        if not options.no_count:
            for server in servers:
                reset_state(stack, redis_client)
                counts[server.name] = count(
                    stack, server, key, workload.name, options.count_submissions,
                    options.senders, trace=not counts,
                )  # fmt: skip
            open_cost = connection_open_cost()
        for name in [n for n in options.profile.split(",") if n]:
            if not (BIN / "py-spy").exists():
                print("py-spy is not installed: no profile", file=sys.stderr)
                break
            reset_state(stack, redis_client)
            profiles[name] = profile(stack, SERVERS[name], key, workload.name, options)

    n, rate = options.submissions, options.rate
    rows = []
    for r in results:
        c = r["closed"]
        rows.append([
            r["server"].name,
            f"{len(c['latencies'])}/{n}",
            r["cpu_ms"],
            " / ".join(f"{t:.2f}" for t in r["by_thread_ms"]),
            f"{len(c['latencies']) / c['wall']:.0f}",
            f"{1000 * percentile(c['latencies'], 50):.1f} / "
            f"{1000 * percentile(c['latencies'], 99):.1f}",
            sum(c["errors"].values()),
            f"{r['idle_ms_per_s']:.0f}",
            r["threads"],
            r["server"].threads,
        ])  # fmt: skip
    print_table(
        ["server (1 process)", "accepted", "CPU ms/submission",
         "of which main / other / exited threads", "req/s", "p50 / p99 ms",
         "errors", "idle CPU ms/s", "threads (max)", "view code runs in"],
        rows,
        title=f"closed loop: {n} submissions from {options.senders} keep-alive senders "
        f"(CPU of the server's process tree / accepted; target <= 2 ms)",
    )  # fmt: skip
    rows = []
    for r in results:
        o = r["open"]
        lat = o["latencies"]
        ok = percentile(lat, 50) <= 0.010 and percentile(lat, 99) <= 0.050 and not o["errors"]
        rows.append([
            r["server"].name,
            f"{len(lat)}/{n}",
            f"{1000 * percentile(lat, 50):.1f}",
            f"{1000 * percentile(lat, 99):.1f}",
            f"{1000 * max(lat):.0f}" if lat else "-",
            ", ".join(f"{k}: {v}" for k, v in o["errors"].items()) or "0",
            r["open_cpu_ms"],
            f"{r['open_cores']:.2f}",
            r["open_connections"],
            f"{1000 * percentile(o['lags'], 99):.1f}",
            "yes" if ok else "no",
        ])  # fmt: skip
    print_table(
        ["server (1 process)", "accepted", "p50 ms", "p99 ms", "max ms", "errors",
         "CPU ms/sub", "server cores", "connections opened", "send lag p99 ms",
         "meets p50<=10, p99<=50, 0 errors"],
        rows,
        title=f"open loop: {n} Poisson arrivals at {rate:.0f}/s, latency from the scheduled "
        "send time",
    )  # fmt: skip
    rows = []
    for r in results:
        c = counts.get(r["server"].name)
        top = ", ".join(f"{k} {v:.2f}" for k, v in r["redis"].most_common(8))
        sql = (
            ", ".join(f"{k} {v:.2f}" for k, v in sorted(c["statements"].items(),
                                                     key=lambda kv: -kv[1]))
            if c else "-"
        )  # fmt: skip
        rows.append([
            r["server"].name,
            f"{r['redis_per_sub']:.2f}",
            ", ".join(f"{k} {v / max(1, len(r['closed']['latencies'])):.2f}"
                      for k, v in r["redis"].most_common(8)) if top else "-",
            f"{c['sql_per_sub']:.2f}" if c else "-",
            sql,
            f"{c['connections_per_sub']:.2f}" if c else "-",
            c["threads_used"] if c else "-",
        ])  # fmt: skip
    print_table(
        ["server", "Redis cmds/sub", "Redis by command (per sub)", "SQL stmts/sub",
         "SQL by first word (per sub)", "DB connections opened/sub", "threads that ran views"],
        rows,
        title="per submission: Redis commands (INFO commandstats over the closed-loop burst) "
        f"and SQL (counting pass, {options.count_submissions} submissions)",
    )  # fmt: skip
    if counts:
        print(f"\nOpening a database connection (connect + PRAGMAs, then close) costs "
              f"{open_cost:.2f} ms of CPU here; a server whose view code runs in a new thread "
              "per request pays it per submission (see 'DB connections opened/sub').")  # fmt: skip
        first = next(iter(counts.values()))
        if first["statements_one"]:
            print("\nSQL of one submission (statement order):")
            for text in first["statements_one"]:
                print(f"  {text}")
        if first["commands_one"]:
            print("\nRedis commands of one submission (MONITOR):")
            for text in first["commands_one"]:
                print(f"  {text}")
    measured = {r["server"].name: r["cpu_ms"] for r in results}
    for name, result in profiles.items():
        print_profile(name, result, measured.get(name, float("nan")))
    if skipped:
        print(f"\nskipped (not installed in the venv): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
