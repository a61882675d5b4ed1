"""A list socket gets its rows coalesced: one frame carrying the latest state of every row that
changed, and the list's counters once (jobs.live_batch)."""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async

from jobs import services
from tests.factories import submit
from tests.helpers import communicator, run, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_list_socket_receives_one_frame_with_every_changed_rows_final_state(
    redis_conn, client, workload, user, settings
):
    # Long enough that every change below falls into one interval, even on a loaded machine
    # (at 3 s, CI once saw a frame sent before the last cancel).
    settings.AIQUEUE_LIVE_LIST_INTERVAL_MS = 8000
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
    rows = re.findall(r'<tr id="job-row-([0-9a-f-]+)" hx-swap-oob="true">', frame)
    assert sorted(rows) == sorted(str(job.code) for job in jobs)  # each row once
    for job in jobs:
        row = frame[frame.index(f'<tr id="job-row-{job.code}"') :]
        row = row[: row.index("</tr>")]
        assert 'data-status="cancelled"' in row  # its final state, not "queued"
    assert frame.count('id="job-counters"') == 1
    assert frame.count('id="job-list-new"') == 1


def _result(coroutine_function):
    box = []

    async def keep():
        box.append(await coroutine_function())

    run(keep)
    return box[0]
