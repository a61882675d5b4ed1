"""./run's watchman (aiqueue/supervision.py): a crash loop is logged, shown on the dashboard,
and not final. The listener is driven here with the events supervisord sends and a stand-in
for its XML-RPC interface; tests/faults/ runs it under a real supervisord."""

from __future__ import annotations

import io
import time

import pytest
from django.contrib.auth.models import Permission, User

from aiqueue import supervision


class FakeSupervisor:
    def __init__(self) -> None:
        self.states = {"worker:worker-1": "RUNNING", "web": "RUNNING"}
        self.started: list[str] = []

    def getAllProcessInfo(self) -> list[dict]:  # noqa: N802 - supervisord's name
        infos = []
        for full, state in self.states.items():
            group, _, name = full.rpartition(":")
            infos.append({"group": group or full, "name": name, "statename": state,
                          "pid": 42, "start": time.time() - 10})  # fmt: skip
        return infos

    def startProcess(self, name: str, wait: bool) -> bool:  # noqa: N802
        self.started.append(name)
        return True


class Rpc:
    def __init__(self) -> None:
        self.supervisor = FakeSupervisor()


WORKER = {"groupname": "worker", "processname": "worker-1"}


def test_a_crash_loop_is_logged_shown_and_retried_later(tmp_path, monkeypatch):
    rpc, log = Rpc(), io.StringIO()
    watchman = supervision.Watchman(rpc, str(tmp_path), log=log)
    for _ in range(3):
        watchman.on_event("PROCESS_STATE_BACKOFF", {**WORKER, "from_state": "STARTING"})
    rpc.supervisor.states["worker:worker-1"] = "FATAL"
    watchman.on_event("PROCESS_STATE_FATAL", {**WORKER, "from_state": "BACKOFF"})
    assert "crash loop: worker:worker-1 gave up" in log.getvalue()

    status = supervision.read_status(tmp_path)
    worker = {p["name"]: p for p in status["processes"]}["worker:worker-1"]
    assert worker["state"] == "FATAL"
    assert worker["crash_loop"]
    assert worker["exits"] == 3

    watchman.on_event("TICK_5", {"when": "0"})
    assert rpc.supervisor.started == []  # it rests first
    later = time.time() + supervision.FATAL_RETRY_S + 1
    monkeypatch.setattr(supervision.time, "time", lambda: later)
    watchman.on_event("TICK_5", {"when": "0"})
    assert rpc.supervisor.started == ["worker:worker-1"]
    assert watchman.fatal_wait["worker:worker-1"] == 2 * supervision.FATAL_RETRY_S


def test_an_old_status_file_is_not_trusted(tmp_path, monkeypatch):
    supervision.Watchman(Rpc(), str(tmp_path)).write_status(time.time())
    assert supervision.read_status(tmp_path) is not None
    later = time.time() + supervision.STALE_AFTER_S + 1
    monkeypatch.setattr(supervision.time, "time", lambda: later)
    assert supervision.read_status(tmp_path) is None


@pytest.mark.django_db
def test_the_dashboard_shows_a_crash_looping_process(client, settings, tmp_path, redis_conn):
    settings.VAR_DIR = tmp_path
    rpc = Rpc()
    rpc.supervisor.states["worker:worker-1"] = "BACKOFF"
    watchman = supervision.Watchman(rpc, str(tmp_path), log=io.StringIO())
    watchman.on_event("PROCESS_STATE_BACKOFF", {**WORKER, "from_state": "STARTING"})
    operator = User.objects.create_user("vera", password="pw-vera-12345")
    operator.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(operator)
    html = client.get("/").content.decode()
    assert 'id="processes"' in html
    assert 'data-crash-loop="1"' in html
    assert "exited while starting; retrying with backoff" in html
