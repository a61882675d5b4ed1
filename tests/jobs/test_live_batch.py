"""A list socket gets its rows coalesced: one frame carrying the latest state of every row that
changed, and the list's counters once (jobs.live_batch)."""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest
from channels.db import database_sync_to_async

from jobs import live, live_batch, services
from tests.factories import submit
from tests.helpers import communicator, run, session_cookie


@pytest.mark.django_db(transaction=True)
def test_a_list_socket_receives_one_frame_with_every_changed_rows_final_state(
    redis_conn, client, workload, user, settings
):
    # Long enough that every change below falls into one interval, even on a loaded machine
    # (at 3 s, CI once saw a frame sent before the last cancel).
    settings.AIQUEUE_LIVE_LIST_INTERVAL_MS = 8000
    # An earlier test's change may still be pending: it must not open this test's window.
    live_batch.batcher.flush()
    cookie = session_cookie(client, user)

    def burst() -> list:
        jobs = [submit(workload, user) for _ in range(5)]
        for job in jobs:
            services.do_cancel_job(job, actor=user)
        return jobs

    async def scenario():
        comm = communicator("/ws/jobs/?parts=row,counters,new", cookie)
        assert (await comm.connect(timeout=5))[0]
        jobs = await database_sync_to_async(burst)()
        frame = await comm.receive_from(timeout=20)
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()
        return jobs, frame

    jobs, frame = _result(scenario)
    rows = re.findall(
        r'<tr id="job-row-([0-9a-f-]+)" data-version="\d+" hx-swap-oob="true">', frame
    )
    assert sorted(rows) == sorted(str(job.code) for job in jobs)  # each row once
    for job in jobs:
        row = frame[frame.index(f'<tr id="job-row-{job.code}"') :]
        row = row[: row.index("</tr>")]
        assert 'data-status="cancelled"' in row  # its final state, not "queued"
    assert frame.count('id="job-counters"') == 1
    assert frame.count('id="job-list-new"') == 1


class Sent:
    """Stands in for rendering and sending: records (time, the job pks of each frame)."""

    def __init__(self, monkeypatch) -> None:
        self.frames: list[tuple[float, list[int]]] = []
        self.event = threading.Event()
        monkeypatch.setattr(live_batch, "render_frames", lambda pending: sorted(pending))
        monkeypatch.setattr(live, "send", self.send)

    def send(self, rendered) -> bool:
        self.frames.append((time.monotonic(), rendered))
        self.event.set()
        return True

    def wait(self, count: int, timeout: float = 15) -> list[list[int]]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count and time.monotonic() < deadline:
            self.event.wait(0.05)
            self.event.clear()
        return [rows for _, rows in self.frames]


def test_the_interval_counts_from_the_first_change_after_a_flush(redis_conn, monkeypatch, settings):
    """A window is opened by the change that finds none open: changes made after a flush (at
    exit, or a caller's) wait a whole interval, so they are not sent early, one by one, by a
    wake-up the flushed window had scheduled."""
    settings.AIQUEUE_LIVE_LIST_INTERVAL_MS = 600
    sent = Sent(monkeypatch)
    batcher = live_batch.ListBatcher()
    batcher.add(SimpleNamespace(pk=1), ["jobs.all"])
    time.sleep(0.3)
    batcher.flush()  # sends job 1; the thread's wake-up for it was due at 0.6 s
    time.sleep(0.1)
    opened = time.monotonic()
    batcher.add(SimpleNamespace(pk=2), ["jobs.all"])
    batcher.add(SimpleNamespace(pk=3), ["jobs.all"])
    assert sent.wait(2) == [[1], [2, 3]]  # the later two in one frame
    assert sent.frames[1][0] - opened >= 0.6  # a whole interval after the first of them


def test_changes_from_several_processes_go_out_as_one_frame_per_interval(
    redis_conn, monkeypatch, settings
):
    """The web process and each worker publish rows: a list gets one frame per interval from
    all of them, not one from each (two batchers here, as two processes would be)."""
    settings.AIQUEUE_LIVE_LIST_INTERVAL_MS = 500
    sent = Sent(monkeypatch)
    web, worker = live_batch.ListBatcher(), live_batch.ListBatcher()
    web.add(SimpleNamespace(pk=1), ["jobs.all"], created=True)
    worker.add(SimpleNamespace(pk=2), ["jobs.all"])
    worker.add(SimpleNamespace(pk=1), ["jobs.all"])
    web.add(SimpleNamespace(pk=3), ["jobs.all"])
    assert sent.wait(1) == [[1, 2, 3]]
    time.sleep(1.0)
    assert len(sent.frames) == 1  # the other process had nothing left to send
    assert not redis_conn.keys("aiqueue:live:*")  # the window closed with its frame


def test_a_frame_whose_owner_died_is_sent_by_another_process(redis_conn, monkeypatch, settings):
    """The process that opened a window died before it sent its frame: one that added to the
    window sends it, once the window's time to live has passed."""
    settings.AIQUEUE_LIVE_LIST_INTERVAL_MS = 200
    sent = Sent(monkeypatch)
    dead, alive = live_batch.ListBatcher(), live_batch.ListBatcher()
    dead._token = "a-process-that-died"
    assert dead.mark({1: True}, ["jobs.all"]) == {"jobs.all"}  # it opened the window, then died
    started = time.monotonic()
    alive.add(SimpleNamespace(pk=2), ["jobs.all"])
    assert sent.wait(1) == [[1, 2]]
    assert sent.frames[0][0] - started >= live_batch.window_ms() / 1000 * 0.9
    assert not redis_conn.keys("aiqueue:live:*")


def _result(coroutine_function):
    box = []

    async def keep():
        box.append(await coroutine_function())

    run(keep)
    return box[0]
