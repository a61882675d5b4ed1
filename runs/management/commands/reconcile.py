"""Run one reconciler pass now: `manage.py reconcile`."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from runs import reconcile


class Command(BaseCommand):
    help = "Re-enqueue queued jobs missing from Redis and recover jobs whose worker died."

    def handle(self, *args, **options) -> None:
        report = reconcile.run()
        self.stdout.write(
            f"requeued {report.requeued} job(s), recovered {report.recovered} stale run(s)"
        )
