"""Start an aiqueue worker: `manage.py worker [--concurrency N] [--burst] [--no-scheduler]`."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connections

from runs.worker import build_worker


class Command(BaseCommand):
    help = (
        "Run an aiqueue worker on the high, default and low queues (in that order), with "
        "--concurrency jobs in flight at once."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--burst", action="store_true", help="Exit when the queues are empty.")
        parser.add_argument(
            "--no-scheduler",
            action="store_true",
            help="Do not run RQ's scheduler (delayed jobs) in this worker.",
        )
        parser.add_argument(
            "--name",
            default=None,
            help="Worker name prefix; the process id is appended (a restarted worker must not "
            "wait for its predecessor's registration in Redis to expire).",
        )
        parser.add_argument(
            "--concurrency",
            "--threads",  # the earlier name
            dest="concurrency",
            type=int,
            default=None,
            help="Jobs run at once in this process (default: AIQUEUE_WORKER_CONCURRENCY); "
            "aiqueue's runs wait on one call loop, not on a thread each.",
        )

    def handle(self, *args, **options) -> None:
        if settings.AIQUEUE_WORKER_NICE:
            # Background work yields the CPU to the web process on a shared machine: a burst
            # of jobs must not slow the pages people are using (docs/architecture.md).
            os.nice(settings.AIQUEUE_WORKER_NICE)
        threads = options["concurrency"] or settings.AIQUEUE_WORKER_CONCURRENCY
        size_db_pool(threads)
        name = f"{options['name']}.{os.getpid()}" if options["name"] else None
        worker = build_worker(name=name, threads=threads)
        connections.close_all()
        worker.work(
            burst=options["burst"],
            with_scheduler=not options["no_scheduler"],
            logging_level=settings.LOGGING["loggers"]["rq.worker"]["level"],
        )


def size_db_pool(threads: int) -> None:
    """Raise the psycopg pool's cap to threads + 4 when --threads asks for more than the
    settings planned for: the heartbeat must never wait behind job threads for a connection."""
    connection = connections["default"]
    pool = connection.settings_dict.get("OPTIONS", {}).get("pool")
    if not isinstance(pool, dict) or pool.get("max_size", 0) >= threads + 4:
        return
    pool["max_size"] = threads + 4
    connection.close_pool()  # rebuilt from the new options on the next connection
