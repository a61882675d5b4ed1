"""`manage.py webhook_worker`: deliver webhooks (jobs.webhooks), with RQ's scheduler for their
retries. Its own process, so a slow receiver never holds a job worker's thread."""

from __future__ import annotations

import os

from django.core.management.base import BaseCommand
from rq import SimpleWorker

from jobs import queueing, webhooks


class Command(BaseCommand):
    help = "Deliver webhooks and their retries (its own RQ queue)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--burst", action="store_true", help="Stop once the queue is empty.")
        parser.add_argument(
            "--name",
            default=None,
            help="Worker name prefix; the process id is appended, as `manage.py worker` does.",
        )

    def handle(self, *args, burst: bool = False, name: str | None = None, **options) -> None:
        # SimpleWorker: a delivery is one short HTTP call; forking for each costs more than it.
        # A restarted process must not wait for its predecessor's registration to expire.
        name = f"{name}-{os.getpid()}" if name else None
        worker = SimpleWorker([webhooks.queue()], connection=queueing.connection(), name=name)
        worker.work(burst=burst, with_scheduler=True)
