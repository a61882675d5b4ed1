"""Every log line a job produces carries job=<code>, also with runs in threads."""

from __future__ import annotations

import logging
import threading

from django.conf import settings

from runs import joblog, runner


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(joblog.JobContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def collecting(name: str) -> Collect:
    handler = Collect()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def test_lines_logged_during_a_run_carry_its_code(monkeypatch):
    handler = collecting("some.library")

    def fake_execute(code: str, *, worker: str = "") -> str:
        logging.getLogger("some.library").info("calling the provider")
        return "succeeded"

    monkeypatch.setattr(runner, "_execute", fake_execute)
    runner.execute("0b4a8c1e-0000-4000-8000-000000000001")
    logging.getLogger("some.library").info("between jobs")

    assert [(r.getMessage(), r.job) for r in handler.records] == [
        ("calling the provider", "0b4a8c1e-0000-4000-8000-000000000001"),
        ("between jobs", "-"),
    ]


def test_concurrent_runs_in_threads_each_log_their_own_code():
    handler = collecting("threaded.library")
    barrier = threading.Barrier(3)

    def run(code: str) -> None:
        with joblog.job_context(code):
            barrier.wait(timeout=5)  # all three are inside their job at the same time
            logging.getLogger("threaded.library").info("working on %s", code)

    threads = [threading.Thread(target=run, args=(f"job-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert sorted((r.args[0], r.job) for r in handler.records) == [
        ("job-0", "job-0"),
        ("job-1", "job-1"),
        ("job-2", "job-2"),
    ]


def test_configured_log_format_prints_the_job_code():
    config = settings.LOGGING
    formatter = logging.Formatter(config["formatters"]["plain"]["format"])
    record = logging.LogRecord("runs.runner", logging.INFO, __file__, 1, "done", None, None)
    with joblog.job_context("abc"):
        joblog.JobContextFilter().filter(record)
    assert "job=abc done" in formatter.format(record)
    assert config["handlers"]["console"]["filters"] == ["job"]
