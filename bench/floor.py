"""The floor of a job's work: a job that does nothing but call the provider.

`provider_call(pk)` is an RQ task that reads a job's row (with its workload and provider),
builds the request as aiqueue does (jobs.kinds), makes the one streamed call over HTTP with the
provider client aiqueue uses, and writes the answer and its times in one UPDATE. No admission,
no run token or heartbeat, no ledger row, events, budgets, retry layer or live updates.

Run by the same `manage.py worker` process as aiqueue's pipeline, its rate is about the most
that any job making one real provider call can reach on this machine with RQ, Django's ORM and
httpx. The dispatch and inflight scenarios print it beside aiqueue's, so the gap between the two
is what aiqueue's bookkeeping costs and the gap to raw RQ is what a provider call costs.
"""

from __future__ import annotations

from typing import Any

TASK = "bench.floor.provider_call"


def provider_call(pk: int) -> None:
    from django.db import close_old_connections
    from django.utils import timezone

    from jobs import kinds
    from jobs.models import Job
    from jobs.providers.registry import get_provider

    started = timezone.now()
    job = Job.objects.select_related("workload__provider").get(pk=pk)
    completion = get_provider(job.workload.provider).complete(
        kinds.build_request(job), lambda text: None
    )
    Job.objects.filter(pk=pk).update(
        status=Job.Status.SUCCEEDED,
        output_text=completion.text,
        started_at=started,
        finished_at=timezone.now(),
    )
    close_old_connections()


def make_rows(workload: Any, n: int) -> list[int]:
    """n queued job rows for `workload`, nothing enqueued; their pks."""
    from jobs.models import Job

    rows = Job.objects.bulk_create(
        Job(workload=workload, input_text=f"floor text number {i}", stage="queued")
        for i in range(n)
    )
    return [row.pk for row in rows]  # SQLite and PostgreSQL both return the new keys


def enqueue(stack: Any, workload: Any, n: int) -> list[int]:
    """n queued job rows for `workload`, each with a `provider_call` on the default queue
    (and no aiqueue run enqueued). Returns their pks."""
    import redis
    from rq import Queue

    pks = make_rows(workload, n)
    queue = Queue("default", connection=redis.Redis.from_url(stack.redis_url))
    with queue.connection.pipeline() as pipe:
        for pk in pks:
            queue.enqueue(TASK, pk, result_ttl=0, pipeline=pipe)
        pipe.execute()
    return pks
