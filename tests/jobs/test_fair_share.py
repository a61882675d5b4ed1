"""Fair share within a priority (jobs.fairshare), against the suite's Redis: the RQ list
itself holds the round-robin order across lanes, so what workers pop and what `rq info` shows
is the order jobs run in."""

from __future__ import annotations

import pytest
from rq.job import JobStatus

from jobs import queueing
from jobs.models import ApiToken, Job, Workload
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def tokens(user, other_user) -> dict[str, ApiToken]:
    owners = {"flood": user, "few": other_user, "third": other_user}
    return {name: factories.make_api_token(owner, name) for name, owner in owners.items()}


@pytest.fixture
def enqueue(redis_conn, django_capture_on_commit_callbacks):
    """enqueue(workload, token, n) -> n new queued jobs of that lane, enqueued in order."""

    def make(workload: Workload, token: ApiToken, n: int) -> list[Job]:
        jobs = Job.objects.bulk_create(
            Job(workload=workload, input_text="x", api_token=token, submitted_by=token.user)
            for _ in range(n)
        )
        # django-rq enqueues on commit, and a rolled-back test never commits.
        with django_capture_on_commit_callbacks(execute=True):
            for job in jobs:
                assert queueing.enqueue(job)
        return jobs

    return make


def queue_order() -> list[str]:
    return queueing.queue("default").get_job_ids()


def ids(jobs: list[Job]) -> list[str]:
    return [job.rq_job_id for job in jobs]


def test_a_second_token_is_served_between_a_floods_jobs(workload, tokens, enqueue):
    flood = enqueue(workload, tokens["flood"], 2000)
    few = enqueue(workload, tokens["few"], 20)

    order = queue_order()
    flood_ids = set(ids(flood))
    for k, job in enumerate(few, start=1):
        ahead = order[: order.index(job.rq_job_id)]
        # The k-th job of the second token waits for about k of the flood's, not 2,000.
        assert sum(1 for each in ahead if each in flood_ids) <= k + 1
    # What `rq info` and the admin read means what it did: every job once, queued.
    rq_queue = queueing.queue("default")
    assert rq_queue.count == 2020
    assert sorted(order) == sorted(ids(flood) + ids(few))
    statuses = {rq_queue.fetch_job(each).get_status() for each in order[::50]}
    assert statuses == {JobStatus.QUEUED}


def test_lanes_take_turns_and_each_keeps_its_arrival_order(workload, tokens, enqueue):
    a = enqueue(workload, tokens["flood"], 5)
    b = enqueue(workload, tokens["few"], 3)
    a += enqueue(workload, tokens["flood"], 2)
    c = enqueue(workload, tokens["third"], 1)

    expected = [a[0], b[0], c[0], a[1], b[1], a[2], b[2], a[3], a[4], a[5], a[6]]
    assert queue_order() == ids(expected)


def test_one_tokens_workloads_are_separate_lanes(workload, provider, tokens, enqueue):
    other = factories.make_workload(provider, name="Translations")
    summaries = enqueue(workload, tokens["flood"], 100)
    translations = enqueue(other, tokens["flood"], 3)

    order = queue_order()
    assert [order.index(each) for each in ids(translations)] == [1, 3, 5]
    assert len(order) == len(summaries) + 3


def test_fair_share_off_queues_first_in_first_out(workload, tokens, enqueue, settings):
    settings.AIQUEUE_FAIR_SHARE = True
    first = enqueue(workload, tokens["flood"], 3) + enqueue(workload, tokens["few"], 2)
    assert queue_order()[:2] == ids(first[:1] + first[3:4])

    queueing.connection().delete(queueing.queue("default").key)
    settings.AIQUEUE_FAIR_SHARE = False
    fifo = enqueue(workload, tokens["flood"], 3) + enqueue(workload, tokens["few"], 2)
    assert queue_order() == ids(fifo)


def test_cancelled_and_popped_entries_do_not_break_later_placement(
    workload, tokens, enqueue, redis_conn
):
    a = enqueue(workload, tokens["flood"], 10)
    key = queueing.queue("default").key
    for job in a[2:6]:
        queueing.remove(job)  # cancelled: off the list, and its rank with it
    redis_conn.lpop(key, 2)  # two taken by workers: their ranks are left behind
    redis_conn.lrem(key, 0, a[7].rq_job_id)  # taken off by something that keeps the rank

    b = enqueue(workload, tokens["few"], 3)

    assert queue_order() == ids([a[6], b[0], b[1], a[8], b[2], a[9]])


def test_an_at_front_enqueue_goes_to_the_front_and_placement_goes_on(workload, tokens, enqueue):
    a = enqueue(workload, tokens["flood"], 50)
    rq_queue = queueing.queue("default")
    urgent = rq_queue.fetch_job(a[30].rq_job_id)
    rq_queue.remove(urgent)
    rq_queue.enqueue_job(urgent, at_front=True)  # as RQ requeues at the front

    b = enqueue(workload, tokens["few"], 2)

    order = queue_order()
    assert order[0] == a[30].rq_job_id
    assert order[1:5] == ids([a[0], b[0], a[1], b[1]])
    assert len(order) == 52


def test_a_recovered_job_queues_in_its_lane_not_behind_a_flood(
    workload, tokens, enqueue, django_capture_on_commit_callbacks
):
    enqueue(workload, tokens["flood"], 200)
    recovered = factories.make_job(
        workload, api_token=tokens["few"], submitted_by=tokens["few"].user, run_by="host/1/2"
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert queueing.enqueue_recovered(recovered)

    assert queue_order().index(recovered.rq_job_id) == 1


def test_a_lane_whose_jobs_were_cancelled_is_not_held_back_by_them(workload, tokens, enqueue):
    cancelled = enqueue(workload, tokens["flood"], 30)
    b = enqueue(workload, tokens["few"], 30)
    for job in cancelled[1:]:
        queueing.remove(job)

    again = enqueue(workload, tokens["flood"], 1)

    # Not behind the other lane's 30 jobs, as the cancelled rounds would have put it.
    assert queue_order()[:3] == ids([cancelled[0], b[0], again[0]])
