"""`manage.py webhook_worker [--threads N] [--burst]`: deliver webhooks (jobs.webhooks) and
budget alerts on their own RQ queue, with RQ's scheduler for their retries.

Its own process, so a slow receiver never holds a job worker's thread; the same worker class
as `manage.py worker` (runs.worker.Worker), so it keeps that worker's guarantees: it rides out
Redis being away, stops gracefully on SIGTERM, and N deliveries run at once, so one receiver
that takes its full timeout does not hold back the others."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connections

from jobs import queueing, webhooks
from runs.worker import Worker

# Deliveries are short HTTP calls with a timeout: a few at once is plenty.
DEFAULT_THREADS = 4


class Command(BaseCommand):
    help = "Deliver webhooks and their retries (its own RQ queue)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--burst", action="store_true", help="Stop once the queue is empty.")
        parser.add_argument(
            "--name",
            default=None,
            help="Worker name prefix; the process id is appended, as `manage.py worker` does.",
        )
        parser.add_argument(
            "--threads",
            type=int,
            default=DEFAULT_THREADS,
            help=f"Deliveries at once in this process (default {DEFAULT_THREADS}).",
        )

    def handle(self, *args, burst: bool = False, name: str | None = None, **options) -> None:
        # A restarted process must not wait for its predecessor's registration to expire.
        name = f"{name}.{os.getpid()}" if name else None
        worker = Worker(
            [webhooks.queue()],
            connection=queueing.connection(),
            name=name,
            threads=max(1, options["threads"]),
        )
        connections.close_all()
        worker.work(
            burst=burst,
            with_scheduler=True,
            logging_level=settings.LOGGING["loggers"]["rq.worker"]["level"],
        )
