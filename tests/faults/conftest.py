"""Fault tests drive a real `./run` in a copy of the repository (tests/test_run_script.py) and
break its processes; `App` starts one, submits jobs through the API and reads what happened
straight from its SQLite database and its supervisor's status file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from aiqueue.redis_server import free_port
from tests.helpers import copy_app, run_env, wait_for, wait_for_url

WORKLOAD = "Meeting notes summary"


class App:
    """One ./run of the copy at `root`, on ports of its own."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.port, self.redis_port, self.sim_port = free_port(), free_port(), free_port()
        self.env = run_env(self.port, self.redis_port, self.sim_port)
        self.env.update(env)
        self.base = f"http://127.0.0.1:{self.port}"
        self.sim = f"http://127.0.0.1:{self.sim_port}"
        self.process: subprocess.Popen | None = None
        self.runs = 0
        self._token = ""

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.runs += 1
        log = open(self.root / f"run-{self.runs}.out", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["bash", "./run"], cwd=self.root, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for_url(f"{self.base}/readyz", timeout=120)
            wait_for(lambda: self.rq_workers() >= int(self.env["AIQUEUE_WORKERS"]), timeout=60)
        except AssertionError as failed:
            raise AssertionError(f"{failed}\n{self.logs_tail()}") from None

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C, as a terminal sends it: SIGINT to ./run's whole process group."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        # Anything left (supervisord's children have process groups of their own).
        for pid in [self._supervisord_pid(), *(p["pid"] for p in self.processes().values())]:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    def _supervisord_pid(self) -> int | None:
        try:
            return int((self.root / "var" / "supervisord.pid").read_text())
        except (OSError, ValueError):
            return None

    def output(self) -> str:
        """What ./run printed, and what the supervision listener logged."""
        files = [self.root / f"run-{n}.out" for n in range(1, self.runs + 1)]
        files.append(self.root / "var" / "log" / "supervision.log")
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def logs_tail(self, lines: int = 15) -> str:
        """The end of what ./run printed and of every log under var/log/: why it did not start."""
        files = [
            self.root / f"run-{self.runs}.out",
            *sorted((self.root / "var" / "log").glob("*.log")),
        ]
        parts = []
        for path in files:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- the supervisor's view -------------------------------------------------------------
    def processes(self) -> dict[str, dict]:
        """name → state, pid, exits, … as the supervision listener last wrote it."""
        try:
            data = json.loads((self.root / "var" / "processes.json").read_text())
        except (OSError, ValueError):
            return {}
        return {p["name"]: p for p in data["processes"]}

    def pid(self, name: str) -> int:
        known = self.processes().get(name)
        if known is not None:
            return known["pid"]
        # No supervisor's view (a ./run without one): find the process by its command line.
        pattern = {"redis": "aiqueue.redis_server"}.get(name, f"--name {name.split(':')[-1]}")
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if pattern in cmdline and Path(os.readlink(entry / "cwd")) == self.root:
                    return int(entry.name)
            except (OSError, ValueError):
                continue
        raise KeyError(name)

    def rq_workers(self) -> int:
        import redis

        try:
            return len(redis.Redis(port=self.redis_port).smembers("rq:workers"))
        except redis.RedisError:
            return 0

    # --- the simulator ---------------------------------------------------------------------
    def sim_control(self, **config) -> dict:
        response = httpx.put(f"{self.sim}/_control", json=config, timeout=5)
        response.raise_for_status()
        return response.json()

    def sim_counters(self) -> dict:
        return httpx.get(f"{self.sim}/_control", timeout=5).json()["counters"]

    # --- jobs --------------------------------------------------------------------------------
    def token(self) -> str:
        if not self._token:
            script = (
                "from jobs.models import ApiToken; from django.contrib.auth.models import User; "
                "t = ApiToken(user=User.objects.get(username='admin'), name='faults'); "
                "k = t.set_new_key(); t.save(); print(k)"
            )
            env = {**self.env, "AIQUEUE_VAR_DIR": str(self.root / "var")}
            done = subprocess.run(
                [".venv/bin/python", "manage.py", "shell", "-c", script], cwd=self.root,
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            self._token = done.stdout.strip().splitlines()[-1]
        return self._token

    def submit(self, n: int, text: str = "Notes of the weekly meeting") -> list[str]:
        codes = []
        with httpx.Client(base_url=self.base, timeout=10) as client:
            for i in range(n):
                response = client.post(
                    "/api/jobs",
                    json={"workload": WORKLOAD, "input": f"{text}, item {i}."},
                    headers={"Authorization": f"Bearer {self.token()}"},
                )
                assert response.status_code == 202, response.text
                codes.append(response.json()["code"])
        return codes

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.root / 'var' / 'aiqueue.sqlite3'}?mode=ro", uri=True)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def statuses(self, codes: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for code in codes:
            (status,) = self.query(
                "SELECT status FROM jobs_job WHERE code = ?", (code.replace("-", ""),)
            )[0]
            counts[status] = counts.get(status, 0) + 1
        return counts

    def attempts(self, codes: list[str]) -> list[tuple]:
        """(job code, number, state, http_status, error_class, cost) of these jobs' calls."""
        marks = ",".join("?" * len(codes))
        sql = (
            "SELECT j.code, a.number, a.state, a.http_status, a.error_class, a.cost "
            "FROM jobs_attempt a JOIN jobs_job j ON j.id = a.job_id WHERE j.code IN (%s)"
        )
        return self.query(sql % marks, tuple(code.replace("-", "") for code in codes))


FAST = {
    "AIQUEUE_WORKERS": "2",
    "AIQUEUE_WORKER_THREADS": "20",
    "AIQUEUE_HEARTBEAT_INTERVAL": "2",
    "AIQUEUE_RECONCILE_INTERVAL": "2",
    "AIQUEUE_ENQUEUE_GRACE": "1",
}


@pytest.fixture
def app_factory(tmp_path):
    apps: list[App] = []

    def make(**env: str) -> App:
        app = App(copy_app(tmp_path / f"app{len(apps)}"), **{**FAST, **env})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
