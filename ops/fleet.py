"""The worker processes as the workers page shows them: from RQ's worker registry in Redis (each
worker's hash, with the identity and concurrency runs.worker adds to it), the running jobs and
calls in flight in the database, the drain requests (jobs.drain) and, under ./run, the
supervisor's view of its processes (var/processes.json: restarts, exits).

A worker killed without a word stays in RQ's registry until its key expires (its TTL + 60 s):
it is shown as gone once its heartbeat is older than `GONE_AFTER_S`, or at once when it ran on
this host and its process is no longer there (jobs.processes.is_dead).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Count
from django.utils import timezone
from rq.utils import utcparse
from rq.worker import Worker as RQWorker

from aiqueue import supervision
from jobs import drain, processes, queueing
from jobs.models import Attempt, Job, Provider

# The worker's monitor beats every AIQUEUE_HEARTBEAT_INTERVAL s (5 by default), and its main
# thread once per dequeue wait (at most the reconcile interval): 30 s silent is a dead worker.
GONE_AFTER_S = 30


@dataclass
class WorkerInfo:
    name: str
    hostname: str
    pid: int | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    threads: int
    identity: str
    is_drained: bool = False
    is_gone: bool = False
    runs: list[dict[str, Any]] = field(default_factory=list)  # code, workload, started_at
    calls_in_flight: int = 0
    supervised: dict[str, Any] | None = None  # its entry in processes.json

    @property
    def heartbeat_age_s(self) -> float | None:
        if self.heartbeat_at is None:
            return None
        return max(0.0, (timezone.now() - self.heartbeat_at).total_seconds())

    @property
    def status(self) -> str:
        if self.is_gone:
            return "gone"
        if self.is_drained:
            return "draining" if self.runs else "drained"
        return "busy" if self.runs else "idle"


def _parse_time(raw: bytes | None) -> datetime | None:
    if not raw:
        return None
    try:
        return utcparse(raw.decode())
    except ValueError:
        return None


def _int(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def workers() -> list[WorkerInfo]:
    """Every job worker RQ knows of, the live ones first, each with its runs and calls."""
    connection = queueing.connection()
    keys = sorted(RQWorker.all_keys(connection=connection))
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        hashes = pipe.execute()
    found = []
    job_queues = set(settings.RQ_QUEUE_NAMES)
    for key, data in zip(keys, hashes, strict=True):
        if not data or b"death" in data:
            continue  # expired meanwhile, or a worker that said goodbye
        if not job_queues & set((data.get(b"queues") or b"").decode().split(",")):
            continue  # not a job worker (the webhooks' deliverer has a queue of its own)
        found.append(
            WorkerInfo(
                name=key.removeprefix(RQWorker.redis_worker_namespace_prefix),
                hostname=(data.get(b"hostname") or b"").decode(),
                pid=_int(data.get(b"pid")),
                started_at=_parse_time(data.get(b"birth")),
                heartbeat_at=_parse_time(data.get(b"last_heartbeat")),
                threads=_int(data.get(b"aiqueue_threads")) or 1,
                identity=(data.get(b"aiqueue_identity") or b"").decode(),
            )
        )
    drained = drain.requested([w.name for w in found])
    runs = _runs_by_process()
    calls = dict(
        Attempt.objects.in_flight()
        .values_list("job__run_by")
        .annotate(n=Count("id"))
        .values_list("job__run_by", "n")
    )
    supervised = _supervised_by_pid()
    here = socket.gethostname()
    for worker in found:
        worker.is_drained = worker.name in drained
        worker.runs = runs.get(worker.identity, []) if worker.identity else []
        worker.calls_in_flight = calls.get(worker.identity, 0) if worker.identity else 0
        age = worker.heartbeat_age_s
        worker.is_gone = (age is not None and age > GONE_AFTER_S) or (
            bool(worker.identity) and processes.is_dead(worker.identity)
        )
        if worker.hostname == here and worker.pid is not None:
            worker.supervised = supervised.get(worker.pid)
    found.sort(key=lambda w: (w.is_gone, w.started_at or timezone.now()))
    return found


def _runs_by_process() -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    rows = (
        Job.objects.filter(status=Job.Status.RUNNING)
        .order_by("started_at")
        .values("run_by", "code", "workload__name", "started_at")
    )
    for row in rows:
        runs.setdefault(row["run_by"], []).append(row)
    return runs


def supervised_workers() -> list[dict[str, Any]]:
    """./run's worker programs as its supervisor last saw them (empty when not under ./run)."""
    status = supervision.read_status(settings.VAR_DIR) or {}
    return [p for p in status.get("processes", []) if p.get("name", "").startswith("worker")]


def _supervised_by_pid() -> dict[int, dict[str, Any]]:
    return {p["pid"]: p for p in supervised_workers() if p.get("pid")}


@dataclass
class ProviderCalls:
    provider: Provider
    in_flight: int

    @property
    def cap(self) -> int | None:
        return self.provider.max_concurrency


def calls_per_provider() -> list[ProviderCalls]:
    """The calls in flight per active provider, from the ledger (Attempt rows in flight)."""
    counts = dict(
        Attempt.objects.in_flight()
        .values_list("provider_id")
        .annotate(n=Count("id"))
        .values_list("provider_id", "n")
    )
    providers = Provider.objects.filter(is_active=True).order_by("name")
    return [ProviderCalls(p, counts.get(p.pk, 0)) for p in providers]
