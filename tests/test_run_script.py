"""`./run` itself, end to end, as a newcomer uses it: in a copy of the repository with nothing
configured but free ports, it serves the app with the embedded defaults (SQLite, its own Redis,
the simulator, a worker), a job submitted through the form succeeds, a second `./run` on the
same port refuses to start, and SIGTERM stops every process it started.

The copy shares this checkout's .venv (a symlink), which `./test` has already filled: `./run`'s
set-up finds it complete and installs nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from aiqueue.redis_server import free_port
from tests.helpers import BASE_DIR, RUN_ADMIN_PASSWORD, copy_app, run_env, wait_for_url

pytestmark = pytest.mark.own_database

PASSWORD = RUN_ADMIN_PASSWORD


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
    # Deep, as checkouts can be: supervisord's control socket must still fit a socket's path
    # (bin/supervisor-socket).
    return copy_app(tmp_path / "a-checkout-in-a-deeply-nested-directory" / "of-some-project")


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
        wait_for_url(f"{base}/readyz", timeout=120)
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
        supervised = json.loads((app_copy / "var" / "processes.json").read_text())["processes"]
        assert {p["name"] for p in supervised} >= {"web", "worker:worker-1", "redis", "simulator"}
        pids = [p["pid"] for p in supervised if p["pid"]]
        pids.append(int((app_copy / "var" / "supervisord.pid").read_text()))
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
    # Nothing it started is left: its supervisor and every process it ran are gone, and the
    # web server, Redis and simulator no longer listen.
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for listening in (port, redis_port, sim_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listening), timeout=1).close()


@pytest.mark.parametrize("deep", [False, True])
def test_the_supervisor_socket_fits_a_sockets_path_however_deep_the_checkout(tmp_path, deep):
    var = tmp_path.joinpath(*["nested-directory"] * 6, "var") if deep else Path("/srv/aiq/var")

    def socket_for(var_dir: Path) -> str:
        return subprocess.run(
            [str(BASE_DIR / "bin" / "supervisor-socket"), str(var_dir)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    socket = socket_for(var)
    # supervisord binds "<socket>.<pid>" first; a Unix socket's path holds 107 bytes.
    assert len(f"{socket}.4194304".encode()) <= 107
    if deep:
        assert socket.startswith("/tmp/aiqueue-supervisor-")
        assert socket == socket_for(var)  # the same var dir, the same socket
        assert socket != socket_for(var.parent / "other-var")
    else:
        assert socket == "/srv/aiq/var/supervisor.sock"
