"""The aiqueue worker: RQ's worker plus the reconciler in its maintenance pass.

Used as `manage.py rqworker --worker-class jobs.worker.Worker --with-scheduler high default low`.
The reconciler runs here rather than as a job scheduled in Redis because it must survive Redis
losing its data: a schedule stored in Redis would be lost with it.
"""

from __future__ import annotations

import logging

import django_rq
from django.conf import settings
from django.db import close_old_connections
from rq.worker import SimpleWorker

from jobs import reconcile

log = logging.getLogger(__name__)

# RQ's worker blocks on the queues for worker_ttl - 15 s; keep that short so the maintenance
# pass (and with it the reconciler) runs every few seconds even on an idle worker.
WORKER_TTL = 30


class Worker(SimpleWorker):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", settings.AIQUEUE_RECONCILE_INTERVAL)
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up at least once per reconcile interval so a dead worker's job is noticed fast.
        return max(1, min(self.worker_ttl - 15, settings.AIQUEUE_RECONCILE_INTERVAL))

    def perform_job(self, job, queue) -> bool:
        # Job boundaries are request boundaries for the database: drop connections that broke
        # or outlived CONN_MAX_AGE, as Django does around each HTTP request.
        close_old_connections()
        try:
            return super().perform_job(job, queue)
        finally:
            close_old_connections()

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            reconcile.run_if_due(settings.AIQUEUE_RECONCILE_INTERVAL)
        except Exception:
            log.exception("reconciler pass failed; the next pass will try again")


def build_worker(*, name: str | None = None) -> Worker:
    queues = [django_rq.get_queue(q) for q in settings.RQ_QUEUE_NAMES]
    return Worker(queues, connection=queues[0].connection, name=name)
