"""A bulkhead for submissions in the web process (ASGI middleware, wired in aiqueue/asgi.py).

Django runs each request's sync code in a thread of its own, and every thread of the process
shares one GIL. A burst of submissions (each a few milliseconds of CPU: row, reservation,
event, enqueue) would otherwise put a hundred threads in front of the page someone is looking
at, and the dashboard would answer in seconds. Here at most AIQUEUE_SUBMIT_CONCURRENCY
submissions run at once per process; the others wait their turn in the event loop, which
costs no CPU, and are answered in arrival order. Throughput does not change (the CPU is
the limit either way); what changes is that other pages compete with a few submissions
instead of all of them.

Only submissions are held: an operator's pause or cancel during a burst must not queue behind
the burst.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

# The API, the job form (documents too) and a batch upload.
SUBMIT_PATHS = re.compile(r"^/(api/jobs|jobs/new/|batches/new/)$")


class SubmissionBulkhead:
    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._semaphore: asyncio.Semaphore | None = None

    def is_submission(self, scope: dict[str, Any]) -> bool:
        return (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and bool(SUBMIT_PATHS.match(scope.get("path", "")))
        )

    async def __call__(self, scope, receive, send) -> None:
        if self.limit <= 0 or not self.is_submission(scope):
            await self.app(scope, receive, send)
            return
        if self._semaphore is None:  # created in the server's event loop
            self._semaphore = asyncio.Semaphore(self.limit)
        async with self._semaphore:
            await self.app(scope, receive, send)
