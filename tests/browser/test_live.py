"""Live pages in real chromium: pushed over websockets by the worker, swapped by htmx, with the
HTTP re-fetch on reconnect and polling while the socket is down."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from playwright.sync_api import expect

from jobs import live, queueing, services
from jobs.models import Job
from tests.browser.pages import TEXT, log_in, open_live_page, submit_held_back, wait_for_status
from tests.factories import submit

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def mark_page(page) -> None:
    """Tag the document; a reload or navigation would lose the tag."""
    page.evaluate("document.body.dataset.sameDocument = 'yes'")


def expect_same_document(page) -> None:
    expect(page.locator("body[data-same-document=yes]")).to_have_count(1)


def test_job_page_shows_queued_running_streamed_text_and_success_without_reload(
    live_app, page, user, workload, simulator, monkeypatch
):
    simulator.control(latency_ms=1500, stream_chunk_delay_ms=120)
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}{job.get_absolute_url()}")
    mark_page(page)
    status = page.locator("#job-status .badge")
    expect(status).to_have_text("Queued")
    expect(page.locator(".live-note")).to_be_hidden()

    queueing.enqueue(job)
    expect(status).to_have_text("Running")
    expect(page.locator("#job-stage")).to_contain_text("Calling the provider · attempt 1")
    expect(page.locator("#job-output-card .streaming")).to_be_visible()
    expect(page.locator("#job-stage")).to_contain_text("Streaming output")
    expect(page.locator("pre#job-output")).not_to_be_empty()
    partial = page.locator("pre#job-output").inner_text()
    assert status.inner_text() == "Running"

    expect(status).to_have_text("Succeeded", timeout=30_000)
    job.refresh_from_db()
    assert job.status == "succeeded"
    expect(page.locator("pre#job-output")).to_have_text(job.output_text)
    assert job.output_text.startswith(partial)
    assert len(partial) < len(job.output_text)
    expect(page.locator("#job-stage")).to_contain_text("Done")
    expect(page.locator("#job-events")).to_contain_text("running → succeeded")
    expect(page.locator("#job-attempts")).to_contain_text(f"{job.cost_actual:.6f}")
    expect(page.locator("#job-actions button")).to_have_count(0)
    expect_same_document(page)


def test_job_list_and_dashboard_counters_update_without_reload(
    live_app, browser, page, user, workload, simulator, monkeypatch
):
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    dashboard = page.context.new_page()
    dashboard.goto(f"{live_app.url}/")
    page.goto(f"{live_app.url}/jobs/")
    mark_page(page)
    mark_page(dashboard)
    row_status = page.locator(f"#job-row-{job.code} .badge")
    expect(row_status).to_have_text("Queued")
    expect(dashboard.locator(".counter.status-queued .count")).to_have_text("1")
    expect(dashboard.locator(".counter.status-succeeded .count")).to_have_text("0")
    # Both pages are subscribed once their socket has opened and re-fetched.
    expect(page.locator("[data-live].live-paused")).to_have_count(0)

    queueing.enqueue(job)
    expect(row_status).to_have_text("Succeeded", timeout=30_000)
    expect(dashboard.locator(".counter.status-succeeded .count")).to_have_text("1")
    expect(dashboard.locator(".counter.status-queued .count")).to_have_text("0")
    job.refresh_from_db()
    expect(page.locator(f"#job-row-{job.code} td.num")).to_have_text(f"{job.cost_actual:.6f}")

    # A job submitted elsewhere shows up in the list and the counters.
    newer = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    expect(page.locator(f"#job-row-{newer.code}")).to_be_visible()
    expect(page.locator("table.jobs tbody tr").first).to_have_id(f"job-row-{newer.code}")
    expect(page.locator(f"#job-row-{newer.code} .badge")).to_have_text("Succeeded", timeout=30_000)
    expect(dashboard.locator(".counter.status-succeeded .count")).to_have_text("2")
    expect_same_document(page)
    expect_same_document(dashboard)


def test_ticked_boxes_survive_when_the_list_is_fetched_again(
    live_app, page, user, workload, monkeypatch
):
    jobs = [submit_held_back(workload, user, monkeypatch) for _ in range(3)]
    log_in(page, live_app, "alice", "pw-alice-123")
    open_live_page(page, f"{live_app.url}/jobs/")
    mark_page(page)
    boxes = [page.locator(f"#job-row-{job.code} input[type=checkbox]") for job in jobs]
    boxes[0].check()
    boxes[2].check()

    # A job submitted elsewhere makes the list fetch its whole table again.
    newer = submit_held_back(workload, user, monkeypatch)
    expect(page.locator("table.jobs tbody tr").first).to_have_id(f"job-row-{newer.code}")
    expect(boxes[0]).to_be_checked()
    expect(boxes[1]).not_to_be_checked()
    expect(boxes[2]).to_be_checked()
    expect(page.locator(f"#job-row-{newer.code} input[type=checkbox]")).not_to_be_checked()
    expect_same_document(page)


def test_pushed_row_adds_no_checkbox_for_a_job_the_viewer_may_not_cancel(
    live_app, page, user, workload, simulator, monkeypatch
):
    # Like a reviewer: sees every job on the list (and its live updates), may cancel none of
    # Alice's.
    viewer = User.objects.create_user("vera", "vera@example.com", "pw-vera-123")
    viewer.user_permissions.add(Permission.objects.get(codename="view_job"))
    simulator.control(latency_ms=1500)
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "vera", "pw-vera-123")
    open_live_page(page, f"{live_app.url}/jobs/")
    row = page.locator(f"#job-row-{job.code}")
    expect(row.locator(".badge")).to_have_text("Queued")
    expect(row.locator("input[type=checkbox]")).to_have_count(0)

    queueing.enqueue(job)
    # The pushed row (still cancellable while it runs) arrives in one swap with its badge.
    expect(row.locator(".badge")).to_have_text("Running")
    # At once, not expect(): the box would go anyway once the job has finished.
    assert row.locator("input[type=checkbox]").count() == 0
    expect(row.locator(".badge")).to_have_text("Succeeded", timeout=30_000)


def test_page_is_correct_after_the_server_drops_the_websocket_and_comes_back(
    live_app, page, user, workload, simulator, monkeypatch
):
    simulator.control(latency_ms=500, stream_chunk_delay_ms=20)
    job = submit_held_back(workload, user, monkeypatch)
    log_in(page, live_app, "alice", "pw-alice-123")
    page.goto(f"{live_app.url}{job.get_absolute_url()}")
    mark_page(page)
    status = page.locator("#job-status .badge")
    expect(status).to_have_text("Queued")
    expect(page.locator(".live-note")).to_be_hidden()

    # The server goes away (chromium's offline emulation leaves open sockets alone, so a real
    # restart it is): the socket drops, the page says so quietly and starts polling.
    live_app.stop_web()
    expect(page.locator(".live-note")).to_be_visible()
    expect(page.locator(".live-note")).to_have_text(
        "Live updates paused; refreshing every few seconds."
    )
    # Everything the job does now is pushed to nobody: those messages are lost.
    queueing.enqueue(job)
    wait_for_status(job, "succeeded")
    assert status.inner_text() == "Queued"

    live_app.restart_web()
    expect(status).to_have_text("Succeeded", timeout=30_000)
    job.refresh_from_db()
    expect(page.locator("pre#job-output")).to_have_text(job.output_text)
    expect(page.locator("#job-events")).to_contain_text("running → succeeded")
    expect(page.locator(".live-note")).to_be_hidden(timeout=30_000)
    expect_same_document(page)


def test_other_user_cannot_subscribe_to_a_job_and_foreign_origins_are_refused(
    live_app, page, user, other_user, workload
):
    # Both jobs start in an hour: the app's worker never runs them, so each cancel below wins
    # and publishes. (A job queued for real could run to success before its cancel, and then
    # no 'Cancelled' would ever come: the wait below timed out that way under load.)
    later = timezone.now() + timedelta(hours=1)
    job = submit(workload, user, TEXT, start_at=later)
    log_in(page, live_app, "bob", "pw-bob-123")
    ws_base = live_app.url.replace("http://", "ws://")
    close_code = """url => new Promise(resolve => {
        const socket = new WebSocket(url);
        socket.onclose = event => resolve(event.code);
    })"""
    assert page.evaluate(close_code, f"{ws_base}/ws/jobs/{job.code}/") == 4403
    # Bob's own list socket is accepted, and it carries Bob's jobs, never Alice's.
    bobs_job = submit(workload, other_user, TEXT, start_at=later)
    page.evaluate(
        """url => new Promise(resolve => {
            window.received = [];
            const socket = new WebSocket(url);
            socket.onmessage = event => window.received.push(event.data);
            socket.onopen = () => resolve();
        })""",
        f"{ws_base}/ws/jobs/?parts=row",
    )
    assert services.do_cancel_job(job, actor=user)  # Alice's: published first
    assert services.do_cancel_job(bobs_job, actor=other_user)
    page.wait_for_function(
        "code => window.received.some(m => m.includes(code) && m.includes('Cancelled'))",
        arg=str(bobs_job.code),
    )
    received = page.evaluate("window.received")
    assert not [message for message in received if str(job.code) in message]

    # A page from another origin cannot open a socket with the user's browser.
    page.route(
        "http://evil.example/",
        lambda route: route.fulfill(status=200, content_type="text/html", body="<p>hi</p>"),
    )
    page.goto("http://evil.example/")
    assert page.evaluate(close_code, f"{ws_base}/ws/jobs/") == 1006


def test_a_row_rendered_earlier_but_arriving_later_does_not_put_an_old_state_back(
    live_app, page, user, workload, monkeypatch
):
    """The web process and the workers each push rows, rendered when they send: a row of the
    job as it was (queued) can arrive after one of it as it is (cancelled). The page keeps the
    newer one (data-version, static/js/live.js)."""
    job, other = (submit_held_back(workload, user, monkeypatch) for _ in range(2))
    as_it_was = Job.objects.get(pk=job.pk)
    log_in(page, live_app, "alice", "pw-alice-123")
    open_live_page(page, f"{live_app.url}/jobs/")
    row = page.locator(f"#job-row-{job.code} .badge")
    expect(row).to_have_text("Queued")

    services.do_cancel_job(job, actor=user)
    expect(row).to_have_text("Cancelled")

    def push(rendered: Job) -> None:
        assert live.send(
            [
                (group, {"type": "jobs.update", "items": [message["parts"]]})
                for group, message in live.render_list_updates(rendered)
            ]
        )

    push(as_it_was)  # the late one: queued, rendered before the cancel
    services.do_cancel_job(other, actor=user)  # then a frame of another row, on the same socket
    expect(page.locator(f"#job-row-{other.code} .badge")).to_have_text("Cancelled")
    # Frames on one socket arrive in order: the stale row came before the other's and was dropped.
    expect(row).to_have_text("Cancelled")
    assert as_it_was.live_version < Job.objects.get(pk=job.pk).live_version
