"""What browser tests share besides fixtures: the live app's handle, logging in, answering
dialogs, and a job held back from its queue so that a page can be opened while it waits."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs import queueing, services
from jobs.models import Job
from tests.helpers import wait_for_port

TEXT = "Notes: the team agreed to ship the new billing page on Friday after the review."


@dataclass
class LiveApp:
    url: str
    port: int
    start_web: Callable[[], subprocess.Popen]
    web: subprocess.Popen

    def stop_web(self) -> None:
        """Stop the ASGI server (open websockets drop), e.g. to test reconnecting."""
        self.web.terminate()
        self.web.wait(timeout=15)

    def restart_web(self) -> None:
        if self.web.poll() is None:
            self.stop_web()
        self.web = self.start_web()
        wait_for_port(self.port)


def log_in(page, app: LiveApp, username: str, password: str) -> None:
    page.goto(f"{app.url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{app.url}/")


def answer_next_dialog(page, *, accept: bool) -> list[str]:
    """Answer the next dialog the page opens; the returned list gets its text."""
    seen: list[str] = []

    def answer(dialog) -> None:
        seen.append(dialog.message)
        if accept:
            dialog.accept()
        else:
            dialog.dismiss()

    page.once("dialog", answer)
    return seen


def submit_held_back(workload, user, monkeypatch) -> Job:
    """A job that stays queued until the test calls `queueing.enqueue(job)` itself, so the page
    can be opened while it is still queued (the reconciler would enqueue it after its grace
    period anyway)."""
    enqueue = queueing.enqueue
    monkeypatch.setattr(queueing, "enqueue", lambda job: None)
    job = services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]
    monkeypatch.setattr(queueing, "enqueue", enqueue)
    return job


def open_live_page(page, url: str) -> None:
    """Open a live page and wait until its socket is open: the page fetches its live regions
    again then (static/js/live.js), with htmx's request header."""
    with page.expect_response(lambda response: response.request.headers.get("hx-request")):
        page.goto(url)


def wait_for_status(job: Job, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"job stayed {job.status}, expected {wanted}")
