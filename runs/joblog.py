"""The job code on every log line a job produces.

The runner wraps each run in `job_context(code)`; a logging filter copies the current code into
every record as `record.job` ("-" outside a job), and the log format prints `job=%(job)s`. The
code lives in a ContextVar, so concurrent runs in threads (or asyncio tasks) of one worker
each see their own code, and library code that logs (httpx, the providers) needs no change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

NO_JOB = "-"

current_job: ContextVar[str] = ContextVar("aiqueue_current_job", default=NO_JOB)


@contextmanager
def job_context(code: Any) -> Iterator[None]:
    token = current_job.set(str(code))
    try:
        yield
    finally:
        current_job.reset(token)


class JobContextFilter(logging.Filter):
    """Adds `record.job`. Attach it to handlers, so records from every logger get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job"):
            record.job = current_job.get()
        return True
