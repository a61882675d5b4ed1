"""The workers page (ops.fleet, ops.fleet_views) and draining a worker (jobs.drain)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone
from rq.utils import utcformat

from jobs import drain, processes, queueing, services
from jobs.models import Attempt, Job
from ops import fleet
from runs.worker import build_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def registered(redis_conn):
    """A threaded worker registered in RQ's registry as a started one is (not running)."""
    made = []

    def register(name: str):
        worker = build_worker(name=name, threads=3)
        worker.register_birth()
        made.append(worker)
        return worker

    yield register
    for worker in made:
        redis_conn.delete(worker.key)
        redis_conn.srem("rq:workers", worker.key)


def test_a_worker_shows_its_identity_concurrency_runs_and_calls(
    registered, workload, user, provider
):
    worker = registered("w-one")
    job = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    Job.objects.filter(pk=job.pk).update(
        status="running", run_by=processes.identity(), started_at=timezone.now()
    )
    Attempt.objects.create(
        job=job, number=1, provider=provider, model="sim-small", started_at=timezone.now(),
        state=Attempt.State.IN_FLIGHT,
    )  # fmt: skip

    (info,) = [w for w in fleet.workers() if w.name == "w-one"]
    assert (info.pid, info.threads, info.identity) == (worker.pid, 3, processes.identity())
    assert [run["code"] for run in info.runs] == [job.code]
    assert info.calls_in_flight == 1
    assert info.status == "busy"
    assert info.heartbeat_age_s < fleet.GONE_AFTER_S
    (calls,) = [row for row in fleet.calls_per_provider() if row.provider == provider]
    assert calls.in_flight == 1


def test_a_worker_whose_heartbeat_stopped_is_gone(registered, redis_conn):
    worker = registered("w-silent")
    old = timezone.now() - timedelta(seconds=fleet.GONE_AFTER_S + 5)
    redis_conn.hset(worker.key, "last_heartbeat", utcformat(old))
    (info,) = [w for w in fleet.workers() if w.name == "w-silent"]
    assert info.is_gone
    assert info.status == "gone"


def test_a_worker_whose_process_ended_on_this_host_is_gone_at_once(registered, redis_conn):
    worker = registered("w-killed")
    host, pid, _start = processes.identity().split("/")
    redis_conn.hset(worker.key, "aiqueue_identity", f"{host}/{2**22 + 7}/123")
    (info,) = [w for w in fleet.workers() if w.name == "w-killed"]
    assert info.is_gone


def test_a_drained_threaded_worker_takes_no_job_until_resumed(redis_conn, workload, user):
    job = services.do_submit_job(workload=workload, input_text="Notes.", user=user)[0]
    drain.request("w-drained")
    build_worker(name="w-drained", threads=2).work(burst=True)
    job.refresh_from_db()
    assert job.status == "queued"
    assert queueing.queue(job.priority).get_job_ids() == [job.rq_job_id]

    drain.withdraw("w-drained")
    build_worker(name="w-drained-again", threads=2).work(burst=True)
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_an_operator_drains_a_worker_from_the_page_and_it_is_audited(registered, client, operator):
    registered("w-page")
    client.force_login(operator)
    page = client.get(reverse("fleet:workers"))
    assert page.status_code == 200
    assert "w-page" in page.content.decode()

    response = client.post(reverse("fleet:drain"), {"name": "w-page", "action": "drain"})
    assert response.status_code == 302
    assert drain.requested(["w-page"]) == {"w-page"}
    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_repr) == (operator, "worker w-page")
    assert "drained" in entry.change_message
    (info,) = [w for w in fleet.workers() if w.name == "w-page"]
    assert info.status == "drained"

    client.post(reverse("fleet:drain"), {"name": "w-page", "action": "resume"})
    assert drain.requested(["w-page"]) == set()


def test_draining_an_unknown_worker_changes_nothing(redis_conn, client, operator):
    client.force_login(operator)
    client.post(reverse("fleet:drain"), {"name": "nobody"})
    assert drain.requested(["nobody"]) == set()
    assert not LogEntry.objects.exists()
