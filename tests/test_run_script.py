"""`./run` itself, end to end, as a newcomer uses it: in a copy of the repository with nothing
configured but free ports, it serves the app with the embedded defaults (SQLite, its own Redis,
the simulator, a worker), a job submitted through the form succeeds, a second `./run` on the
same port refuses to start, and SIGTERM stops every process it started.

The copy shares this checkout's .venv (a symlink), which `./test` has already filled: `./run`'s
set-up finds it complete and installs nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from aiqueue.redis_server import free_port
from tests.conftest import BASE_DIR

# What a checkout holds besides the code: none of it belongs in the copy.
NOT_COPIED = shutil.ignore_patterns(".venv", "var", ".git", "__pycache__", "*.pyc", ".ci")
PASSWORD = "pw-admin-run-123"


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
        AIQUEUE_ADMIN_PASSWORD=PASSWORD,
        AIQUEUE_WORKERS="1",
        AIQUEUE_WORKER_THREADS="2",
    )
    return env


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


def log_in(client: httpx.Client) -> None:
    client.get("/accounts/login/")
    response = client.post(
        "/accounts/login/",
        data={
            "username": "admin",
            "password": PASSWORD,
            "csrfmiddlewaretoken": client.cookies["csrftoken"],
        },
    )
    assert response.status_code == 302, response.text[:500]


def submit_form_job(client: httpx.Client, text: str) -> str:
    form = client.get("/jobs/new/").text
    options = dict(
        (label, value) for value, label in re.findall(r'<option value="(\d+)"[^>]*>([^<]+)<', form)
    )
    response = client.post(
        "/jobs/new/",
        data={
            "workload": options["Meeting notes summary"],
            "input_text": text,
            "priority": "",
            "idempotency_key": "run-script-test",
            "csrfmiddlewaretoken": client.cookies["csrftoken"],
        },
    )
    assert response.status_code == 302, response.text[:500]
    return response.headers["location"]


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "aiqueue"
    shutil.copytree(BASE_DIR, copy, ignore=NOT_COPIED)
    (copy / ".venv").symlink_to(BASE_DIR / ".venv")
    return copy


def test_run_serves_the_app_runs_a_job_and_stops_everything_on_sigterm(app_copy: Path):
    port, redis_port, sim_port = free_port(), free_port(), free_port()
    env = run_env(port, redis_port, sim_port)
    log = open(app_copy / "run.out", "w")  # noqa: SIM115
    run = subprocess.Popen(
        ["bash", "./run"], cwd=app_copy, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/readyz", timeout=120)
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["checks"] == {"database": "ok", "redis": "ok"}
        assert (app_copy / "var" / "aiqueue.sqlite3").exists()  # the embedded default

        with httpx.Client(base_url=base, timeout=10) as client:
            log_in(client)
            job_url = submit_form_job(client, "<script>alert(1)</script> Ship on Friday.")
            deadline = time.monotonic() + 60
            page = ""
            while time.monotonic() < deadline:
                page = client.get(job_url).text
                if 'data-status="succeeded"' in page:
                    break
                time.sleep(0.5)
            assert 'data-status="succeeded"' in page, "the job did not succeed under ./run"
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
            assert "<script>alert(1)</script>" not in page

        # A second ./run on the same port says why it will not start, and harms nothing.
        second = subprocess.run(
            ["bash", "./run"], cwd=app_copy, env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert f"Port {port} on 127.0.0.1 is already in use" in second.stderr
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=30)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
            log.close()
    output = (app_copy / "run.out").read_text()
    assert "stopped." in output, output[-2000:]
    # Nothing it started is left: its worker (named after ./run's pid) is gone, and the web
    # server, Redis and simulator no longer listen.
    worker = subprocess.run(["pgrep", "-f", f"worker-1-{run.pid}"], capture_output=True, text=True)
    assert worker.stdout == "", output[-2000:]
    for listening in (port, redis_port, sim_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listening), timeout=1).close()
