"""Start an aiqueue worker: `manage.py worker [--burst] [--no-scheduler]`."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connections

from jobs.worker import build_worker


class Command(BaseCommand):
    help = "Run an aiqueue worker on the high, default and low queues (in that order)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--burst", action="store_true", help="Exit when the queues are empty.")
        parser.add_argument(
            "--no-scheduler",
            action="store_true",
            help="Do not run RQ's scheduler (delayed jobs) in this worker.",
        )
        parser.add_argument("--name", default=None)

    def handle(self, *args, **options) -> None:
        worker = build_worker(name=options["name"])
        connections.close_all()
        worker.work(
            burst=options["burst"],
            with_scheduler=not options["no_scheduler"],
            logging_level=settings.LOGGING["loggers"]["rq.worker"]["level"],
        )
