"""Live progress: websocket consumers (auth, groups) and what the workers publish, through the
real ASGI application and the real channel layer on the suite's Redis."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission, User
from django.db import transaction

from batches import services as batch_services
from jobs import live, services
from jobs.models import Job, JobEvent
from review.models import ReviewItem
from tests.factories import make_batch, make_user, submit
from tests.helpers import BASE_DIR, communicator, run, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


async def assert_closed_forbidden(comm: WebsocketCommunicator) -> None:
    connected, _ = await comm.connect(timeout=5)
    assert connected
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4403}


# --------------------------------------------------------------------------- who may listen


def test_anonymous_websocket_is_closed_as_forbidden(redis_conn, workload, user):
    job = submit(workload, user)

    async def scenario():
        await assert_closed_forbidden(communicator(f"/ws/jobs/{job.code}/"))
        await assert_closed_forbidden(communicator("/ws/jobs/"))

    run(scenario)


def test_other_user_cannot_subscribe_to_a_job_they_cannot_see(
    redis_conn, client, workload, user, other_user
):
    job = submit(workload, user)
    cookie = session_cookie(client, other_user)

    async def scenario():
        await assert_closed_forbidden(communicator(f"/ws/jobs/{job.code}/", cookie))

    run(scenario)


def test_unknown_job_code_is_closed_as_forbidden(redis_conn, client, user):
    cookie = session_cookie(client, user)

    async def scenario():
        await assert_closed_forbidden(communicator(f"/ws/jobs/{uuid.uuid4()}/", cookie))

    run(scenario)


def test_websocket_from_a_foreign_origin_is_refused(redis_conn, client, workload, user):
    job = submit(workload, user)
    cookie = session_cookie(client, user)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie, origin=b"https://evil.example")
        connected, _ = await comm.connect(timeout=5)
        assert not connected

    run(scenario)


def test_owner_receives_the_rendered_partials_when_the_job_changes(
    redis_conn, client, workload, user
):
    job = submit(workload, user)
    cookie = session_cookie(client, user)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie)
        connected, _ = await comm.connect(timeout=5)
        assert connected
        await database_sync_to_async(services.do_cancel_job)(job, actor=user, reason="no need")
        html = await comm.receive_from(timeout=5)
        await comm.disconnect()
        assert '<dl id="job-summary" hx-swap-oob="true">' in html
        assert 'data-status="cancelled"' in html
        assert "queued → cancelled" in html
        assert '<div id="job-actions" hx-swap-oob="true">' in html
        assert "Cancel job" not in html  # a cancelled job has nothing left to cancel

    run(scenario)


def test_a_watched_jobs_page_is_sent_its_update_without_the_layers_group_send(
    redis_conn, client, workload, user, monkeypatch
):
    """The job page's message goes out from the publishing thread in one script call (the
    channels it names read from the membership check), not by group_send on the publishing
    loop: a second socket on the same page and one in another process (a layer of its own)
    each get it once, as channels-redis's own consumers read it."""
    from channels.layers import get_channel_layer
    from channels_redis.core import RedisChannelLayer
    from django.conf import settings

    job = submit(workload, user)
    cookie = session_cookie(client, user)
    elsewhere = RedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])
    calls = []

    async def group_send(group, message):
        calls.append(group)

    async def scenario():
        first = communicator(f"/ws/jobs/{job.code}/", cookie)
        second = communicator(f"/ws/jobs/{job.code}/", cookie)
        for comm in (first, second):
            connected, _ = await comm.connect(timeout=5)
            assert connected
        other = await elsewhere.new_channel()
        await elsewhere.group_add(live.job_group(job.code), other)
        # This loop's layer (run() makes a new one), the one the publish will use.
        monkeypatch.setattr(get_channel_layer(), "group_send", group_send)
        await database_sync_to_async(services.do_cancel_job)(job, actor=user, reason="no need")
        pages = [await comm.receive_from(timeout=5) for comm in (first, second)]
        message = await asyncio.wait_for(elsewhere.receive(other), 5)
        for comm in (first, second):
            assert await comm.receive_nothing(timeout=0.3)
            await comm.disconnect()
        await elsewhere.group_discard(live.job_group(job.code), other)
        assert calls == []
        for html in pages:
            assert 'data-status="cancelled"' in html
        assert message["type"] == "job.update"
        assert 'data-status="cancelled"' in message["html"]

    run(scenario)


def test_a_pushed_frame_is_forwarded_without_a_turn_in_the_sync_thread(
    redis_conn, client, workload, user, monkeypatch
):
    """Channels' default dispatch runs close_old_connections in the process's one sync thread
    before every handler; the forwarding handlers touch no database, so a pushed frame must
    not queue there behind every other socket's."""
    import channels.consumer

    job = submit(workload, user)
    cookie = session_cookie(client, user)
    turns = []

    async def counted():
        turns.append(1)

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie)
        connected, _ = await comm.connect(timeout=5)
        assert connected
        before = len(turns)
        await database_sync_to_async(services.do_cancel_job)(job, actor=user, reason="no need")
        html = await comm.receive_from(timeout=5)
        after = len(turns)
        await comm.disconnect()
        assert 'data-status="cancelled"' in html
        assert after == before

    run(scenario)


def test_viewer_who_may_not_change_the_job_gets_no_cancel_form(redis_conn, client, workload, user):
    viewer = User.objects.create_user("vera", password="pw-vera-123")
    viewer.user_permissions.add(Permission.objects.get(codename="view_job"))
    job = submit(workload, user)
    owner_cookie = session_cookie(client, user)
    viewer_cookie = session_cookie(client.__class__(), viewer)

    async def scenario():
        owner = communicator(f"/ws/jobs/{job.code}/", owner_cookie)
        watcher = communicator(f"/ws/jobs/{job.code}/", viewer_cookie)
        assert (await owner.connect(timeout=5))[0]
        assert (await watcher.connect(timeout=5))[0]
        await database_sync_to_async(live.publish_job)(job.pk)
        owner_html = await owner.receive_from(timeout=5)
        watcher_html = await watcher.receive_from(timeout=5)
        await owner.disconnect()
        await watcher.disconnect()
        assert "Cancel job" in owner_html
        assert "Cancel job" not in watcher_html
        assert 'data-status="queued"' in watcher_html

    run(scenario)


def test_job_list_follows_own_jobs_only_and_operators_follow_all(
    redis_conn, client, workload, user, other_user, operator
):
    alice_job = submit(workload, user)
    cookies = {
        "alice": session_cookie(client, user),
        "bob": session_cookie(client.__class__(), other_user),
        "olga": session_cookie(client.__class__(), operator),
    }

    async def scenario():
        comms = {
            name: communicator("/ws/jobs/?parts=row,counters", cookie)
            for name, cookie in cookies.items()
        }
        for comm in comms.values():
            assert (await comm.connect(timeout=5))[0]
        await database_sync_to_async(services.do_cancel_job)(alice_job, actor=user)
        alice_html = await comms["alice"].receive_from(timeout=5)
        olga_html = await comms["olga"].receive_from(timeout=5)
        assert await comms["bob"].receive_nothing(timeout=0.5)
        for comm in comms.values():
            await comm.disconnect()
        for html in (alice_html, olga_html):
            assert re.search(
                f'<tr id="job-row-{alice_job.code}" data-version="\\d+" hx-swap-oob', html
            )
            assert 'id="job-counters" hx-swap-oob="true"' in html
            assert 'data-status="cancelled"' in html

    run(scenario)


def test_list_is_told_about_a_new_job_only_when_it_asked(redis_conn, client, workload, user):
    cookie = session_cookie(client, user)

    async def scenario():
        asked = communicator("/ws/jobs/?parts=row,new", cookie)
        rows_only = communicator("/ws/jobs/?parts=row", cookie)
        assert (await asked.connect(timeout=5))[0]
        assert (await rows_only.connect(timeout=5))[0]
        job = await database_sync_to_async(submit)(workload, user)
        asked_html = await asked.receive_from(timeout=5)
        rows_html = await rows_only.receive_from(timeout=5)
        await database_sync_to_async(services.do_cancel_job)(job, actor=user)
        later_html = await asked.receive_from(timeout=5)
        await asked.disconnect()
        await rows_only.disconnect()
        assert '<span id="job-list-new" data-live-stale hidden hx-swap-oob="true">' in asked_html
        assert "job-list-new" not in rows_html
        assert f"job-row-{job.code}" in rows_html
        assert "job-list-new" not in later_html  # a status change is a row swap, no re-fetch

    run(scenario)


def test_counters_count_what_the_group_may_see(redis_conn, client, workload, user, other_user):
    submit(workload, other_user)
    submit(workload, other_user)
    job = submit(workload, user)
    cookie = session_cookie(client, user)

    async def scenario():
        comm = communicator("/ws/jobs/?parts=counters", cookie)
        assert (await comm.connect(timeout=5))[0]
        await database_sync_to_async(live.publish_job)(job.pk)
        html = await comm.receive_from(timeout=5)
        await comm.disconnect()
        assert "job-row-" not in html  # only the parts this page asked for
        queued = html.split("status-queued", 1)[1]
        assert '<span class="count">1</span>' in queued.split("</a>", 1)[0]

    run(scenario)


# --------------------------------------------------------------------------- what is published


def test_rolled_back_transition_publishes_nothing(redis_conn, client, workload, user):
    job = submit(workload, user)
    cookie = session_cookie(client, user)

    def cancel_then_roll_back() -> None:
        with transaction.atomic():
            assert services.do_cancel_job(job, actor=user)
            transaction.set_rollback(True)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie)
        assert (await comm.connect(timeout=5))[0]
        await database_sync_to_async(cancel_then_roll_back)()
        assert await comm.receive_nothing(timeout=1)
        await comm.disconnect()

    run(scenario)
    job.refresh_from_db()
    assert job.status == "queued"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stream_publishes_first_chunk_then_at_most_every_interval_and_always_the_last(
    redis_conn, client, workload, user
):
    job = submit(workload, user)
    job.attempt_count = 1
    cookie = session_cookie(client, user)
    clock = FakeClock()
    started = []
    stream = live.OutputStream(job, interval=0.1, clock=clock, on_first=lambda: started.append(1))

    def feed() -> None:
        for i in range(30):  # 30 chunks 10 ms apart: 0.29 s of streaming
            stream(f"w{i} ")
            clock.now += 0.01
        stream.close()

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie)
        assert (await comm.connect(timeout=5))[0]
        await database_sync_to_async(feed)()
        received = [await comm.receive_from(timeout=10) for _ in range(stream.published)]
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()
        return received

    received = run(scenario)
    # At t = 0, 0.1, 0.2 (chunks 0, 10, 20), then the final state at close.
    assert stream.published == len(received) == 4
    assert started == [1]
    assert "w0 " in received[0]
    assert "w1 " not in received[0]
    assert "w10 " in received[1]
    assert "w11 " not in received[1]
    assert "w29" in received[-1]
    assert "streaming…" in received[0]
    assert "streaming…" not in received[-1]


def test_streamed_output_is_escaped_and_not_processed_by_htmx(workload, user):
    job = submit(workload, user)
    message = live.render_output(job, 'Sure! <script>alert(1)</script><img src=x onerror="x()">')
    html = message["html"]
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html
    assert '<pre class="output" id="job-output" hx-disable>' in html


@pytest.fixture
def sent(monkeypatch) -> list:
    """What a stream publishes, captured instead of sent; every group counts as listened to."""
    captured: list = []
    monkeypatch.setattr(live, "send", lambda messages, *_: captured.extend(messages) or True)
    monkeypatch.setattr(live, "members", lambda groups: dict.fromkeys(groups))
    return captured


def test_a_retry_restarts_the_streamed_text(workload, user, sent):
    job = submit(workload, user)
    stream = live.OutputStream(job, interval=0)
    job.attempt_count = 1
    stream("partial answer that broke")
    job.attempt_count = 2
    stream("fresh")
    stream.close()
    assert stream.text == "fresh"
    assert "broke" not in sent[-1][1]["html"]


def test_a_self_rated_answers_rating_line_is_not_streamed_to_the_page(workload, user, sent):
    workload.confidence_source = "self_rated"
    workload.save()
    job = submit(workload, user)
    stream = live.OutputStream(job, interval=0)
    job.attempt_count = 1
    for delta in ("The plan", " is sound.", "\nConfidence: 0.", "87"):
        stream(delta)
    stream.close()
    assert "The plan is sound." in sent[-1][1]["html"]
    assert "Confidence" not in sent[-1][1]["html"]
    assert "Confidence: 0.87" in stream.text  # the answer itself is kept whole for parsing


def test_worker_publishes_every_stage_of_a_streamed_run(
    redis_conn, client, workload, user, run_worker, simulator
):
    simulator.control(stream_chunk_delay_ms=0)
    job = submit(workload, user)
    cookie = session_cookie(client, user)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie)
        assert (await comm.connect(timeout=5))[0]
        await database_sync_to_async(run_worker)()
        received = [await comm.receive_from(timeout=10)]
        while 'data-status="succeeded"' not in received[-1]:
            received.append(await comm.receive_from(timeout=10))
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()
        return received

    received = run(scenario)
    job.refresh_from_db()
    assert job.status == "succeeded"
    stages = [
        stage
        for html in received
        for stage in (
            "Calling the provider",
            "Streaming output",
            "Done",
        )
        if f">{stage}</span>" in html
    ]
    # Judging the answer has no stage of its own (it takes no time): streaming, then done.
    assert stages == ["Calling the provider", "Calling the provider", "Streaming output",
                      "Done"]  # fmt: skip
    assert any("streaming…" in html for html in received)
    assert 'data-status="succeeded"' in received[-1]
    assert job.output_text.split()[-1] in received[-1]


def test_a_job_nobody_watches_is_not_rendered_or_sent(
    workload, user, redis_conn, monkeypatch, django_assert_num_queries
):
    job = submit(workload, user)
    sent, rendered = [], []
    monkeypatch.setattr(live, "send", lambda messages, *_: sent.extend(messages) or True)
    monkeypatch.setattr(live, "render_job_update", lambda job: rendered.append(job) or {})
    assert live.publish_job(job.pk)
    # As published on commit, with the Job: who listens is asked before any query.
    with django_assert_num_queries(0):
        assert live.publish_job(job)
    assert sent == []
    assert rendered == []


def test_the_raw_reads_of_a_publish_match_the_orm(
    workload, user, redis_conn, simulator, run_worker
):
    job = submit(workload, user)
    run_worker()
    job = Job.objects.select_related("workload__provider", "submitted_by").get(pk=job.pk)
    JobEvent.objects.create(job=job, actor=user, from_status="succeeded", to_status="succeeded")
    assert job.attempts.count() == 1
    assert job.events.filter(actor=user).count() == 2  # submitted, and the one above

    fresh = live._job_for_render(job.pk, like=job)
    orm = Job.objects.get(pk=job.pk)
    for field in Job._meta.concrete_fields:
        assert getattr(fresh, field.attname) == getattr(orm, field.attname), field.name
    assert fresh.workload is job.workload  # lent by the caller, not read again

    event_fields = ("id", "created_at", "from_status", "to_status", "reason", "actor_label")
    assert [tuple(getattr(e, f) for f in event_fields) for e in live.job_history(job)] == [
        tuple(getattr(e, f) for f in event_fields) for e in job.events.select_related("actor")
    ]
    ledger_fields = ("id", "number", "provider_label", "model", "tokens_out", "cost", "error_class")
    assert [tuple(getattr(a, f) for f in ledger_fields) for a in live.job_ledger(job)] == [
        tuple(getattr(a, f) for f in ledger_fields) for a in job.attempts.select_related("provider")
    ]
    assert live.job_ledger(Job(pk=job.pk, attempt_count=0)) == []


# --------------------------------------------------------------------------- stale notices


def test_batch_and_inbox_sockets_refuse_who_may_not_see_them(
    redis_conn, client, workload, user, other_user
):
    batch = make_batch(workload, user)
    outsider = session_cookie(client, other_user)  # not the batch's owner, not a reviewer

    async def scenario():
        await assert_closed_forbidden(communicator(f"/ws/batches/{batch.code}/"))
        await assert_closed_forbidden(communicator("/ws/review/"))
        await assert_closed_forbidden(communicator(f"/ws/batches/{batch.code}/", outsider))
        await assert_closed_forbidden(communicator(f"/ws/batches/{uuid.uuid4()}/", outsider))
        await assert_closed_forbidden(communicator("/ws/review/", outsider))

    run(scenario)


def test_batch_page_is_told_when_the_batch_or_one_of_its_jobs_changes(
    redis_conn, client, workload, user
):
    batch, other = make_batch(workload, user), make_batch(workload, user)
    cookie = session_cookie(client, user)

    async def scenario():
        comm = communicator(f"/ws/batches/{batch.code}/", cookie)
        assert (await comm.connect(timeout=5))[0]
        bystander = communicator(f"/ws/batches/{other.code}/", cookie)
        assert (await bystander.connect(timeout=5))[0]

        # Started: one notice for the status and the whole first wave (one transaction each).
        await database_sync_to_async(batch_services.do_start_batch)(batch)
        assert await comm.receive_from(timeout=5) == live.STALE_HTML
        assert await comm.receive_from(timeout=5) == live.STALE_HTML
        assert await comm.receive_nothing(timeout=0.5)
        # One of its jobs changed (a worker's publish).
        job = await database_sync_to_async(Job.objects.filter(batch=batch).first)()
        await database_sync_to_async(services.do_cancel_job)(job, actor=user)
        assert await comm.receive_from(timeout=5) == live.STALE_HTML
        await database_sync_to_async(batch_services.do_pause_batch)(batch)
        assert await comm.receive_from(timeout=5) == live.STALE_HTML
        assert await bystander.receive_nothing(timeout=0.5)  # another batch hears nothing
        await comm.disconnect()
        await bystander.disconnect()

    run(scenario)


def test_inbox_is_told_of_an_escalation_once_per_transaction_and_never_on_rollback(
    redis_conn, client, classify_workload, user, run_worker
):
    cookie = session_cookie(client, make_user("rita", role="reviewer"))

    def twice_then_roll_back() -> None:
        with transaction.atomic():
            live.stale_on_commit(live.REVIEW_GROUP)
            live.stale_on_commit(live.REVIEW_GROUP)
            transaction.set_rollback(True)

    def twice_in_one_transaction() -> None:
        with transaction.atomic():
            live.stale_on_commit(live.REVIEW_GROUP)
            live.stale_on_commit(live.REVIEW_GROUP)

    def escalate() -> None:
        submit(classify_workload, user, "Buy now [[low-confidence]]")
        run_worker()

    async def scenario():
        comm = communicator("/ws/review/", cookie)
        assert (await comm.connect(timeout=5))[0]
        await database_sync_to_async(twice_then_roll_back)()
        assert await comm.receive_nothing(timeout=0.5)
        await database_sync_to_async(twice_in_one_transaction)()
        assert await comm.receive_from(timeout=5) == live.STALE_HTML
        assert await comm.receive_nothing(timeout=0.5)
        await database_sync_to_async(escalate)()
        assert await comm.receive_from(timeout=5) == live.STALE_HTML
        await comm.disconnect()

    run(scenario)
    assert ReviewItem.objects.filter(reason="low_confidence").count() == 1


def test_an_idle_socket_stays_open_past_the_channel_layers_blocking_read(
    redis_conn, client, workload, user
):
    # channels-redis waits 5 s per BZPOPMIN; redis-py 8 gave that read a 5 s socket timeout,
    # so every idle consumer died with TimeoutError after ~5 s (the browser saw 1006).
    job = submit(workload, user)
    cookie = session_cookie(client, user)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.code}/", cookie)
        assert (await comm.connect(timeout=5))[0]
        assert await comm.receive_nothing(timeout=12, interval=0.5)  # idle, and not closed
        await database_sync_to_async(services.do_cancel_job)(job, actor=user, reason="late")
        assert 'data-status="cancelled"' in await comm.receive_from(timeout=5)
        await comm.disconnect()

    run(scenario)


def test_a_group_found_empty_is_not_asked_about_again_for_the_cache_time(redis_conn, settings):
    from channels.layers import get_channel_layer

    settings.AIQUEUE_LIVE_UNWATCHED_CACHE_MS = 300
    group = live.job_group(uuid.uuid4())
    assert live.members([group]) == {}

    async def join() -> str:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        return channel

    channel = run(join)
    # Within the cache time the group still counts as empty: no round trip to Redis.
    assert live.members([group]) == {}
    time.sleep(0.35)
    assert live.members([group]) == {group: [channel]}
    # A group with someone in it is asked about every time (only emptiness is kept).
    run(lambda: get_channel_layer().group_discard(group, channel))
    assert live.members([group]) == {}


def test_a_page_re_fetches_once_more_after_the_longest_cache_time():
    """What changed while a publisher still took a page's group as empty reaches the page by
    its second re-fetch after its socket opened: that must come after the longest cache time
    the settings allow."""
    script = (BASE_DIR / "static" / "js" / "live.js").read_text()
    recheck_ms = int(re.search(r"var RECHECK_MS = (\d+);", script).group(1))
    assert recheck_ms >= 1000 + 250  # the settings' maximum, and a margin for the socket's join


def test_a_just_created_job_does_not_ask_whether_its_own_page_is_watched(
    redis_conn, workload, user, monkeypatch
):
    asked: list[list[str]] = []
    real = live.members
    monkeypatch.setattr(live, "members", lambda groups: asked.append(groups) or real(groups))
    job = submit(workload, user, "fresh")
    live.publish_job(job, created=True)
    live.publish_job(job)
    assert asked[-2]  # the lists that see it
    assert live.job_group(job.code) not in asked[-2]
    assert live.job_group(job.code) in asked[-1]
