"""Priorities: workers take from `high` first, then `default`, then `low` — with a starvation
guard, so low-priority work still moves under sustained high-priority load.

The guard counts consecutive dequeues from the higher queues; after `every` of them the next
dequeue looks at the queues in reverse order (`low` first). If `low` is empty that costs
nothing (the worker's blocking pop takes the first non-empty queue), and as soon as a `low`
job is taken the count starts again. So under saturation at least one job in `every + 1`
comes from `low`.

`StarvationGuardMixin` plugs this into RQ's worker through its `reorder_queues` hook (called
after every dequeue); a worker that dequeues by itself can call `StarvationGuard.order()`.
"""

from __future__ import annotations

import threading

from django.conf import settings
from rq.worker import DequeueStrategy


class StarvationGuard:
    def __init__(self, names: list[str], every: int) -> None:
        self.names = list(names)  # highest priority first
        self.every = max(1, every)
        self._since_lowest = 0
        self._lock = threading.Lock()

    def order(self, dequeued_from: str | None = None) -> list[str]:
        """Record a dequeue from `dequeued_from` (None: none yet) and return the queue order
        for the next one."""
        with self._lock:
            if dequeued_from is not None:
                if dequeued_from == self.names[-1]:
                    self._since_lowest = 0
                else:
                    self._since_lowest += 1
            if self._since_lowest >= self.every:
                return list(reversed(self.names))
            return list(self.names)


class StarvationGuardMixin:
    """For an RQ Worker subclass: `class Worker(StarvationGuardMixin, SimpleWorker)`."""

    def reorder_queues(self, reference_queue) -> None:
        if self._dequeue_strategy not in (None, DequeueStrategy.DEFAULT):
            # `work(dequeue_strategy="round_robin" | "random")` asked for RQ's own order.
            super().reorder_queues(reference_queue)
            return
        guard = getattr(self, "_starvation_guard", None)
        if guard is None:
            guard = StarvationGuard(
                [q.name for q in self.queues], settings.AIQUEUE_STARVATION_GUARD_EVERY
            )
            self._starvation_guard = guard
        by_name = {q.name: q for q in self.queues}
        self._ordered_queues = [by_name[name] for name in guard.order(reference_queue.name)]
