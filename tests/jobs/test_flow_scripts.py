"""Issue 20: every flow-control script's keys share one hash slot, and a script Redis refuses
(here a key of the wrong type, as a Cluster's cross-slot refusal would be) is an error that
fails closed, never a warning that lets every call through."""

from __future__ import annotations

import logging

import pytest
from redis.crc import key_slot

from jobs import services
from jobs.flow import breaker, leases, rate_limits, retry_budget


def one_slot(keys: list[str]) -> bool:
    return len({key_slot(key.encode()) for key in keys}) == 1


def test_each_scripts_keys_share_one_hash_slot(workload):
    provider = workload.provider
    provider.rpm_limit, provider.tpm_limit, provider.max_concurrency = 60, 10_000, 2
    workload.concurrency_cap = 1
    assert one_slot(breaker._keys(provider.pk))
    assert one_slot(retry_budget._keys(provider.pk))
    assert one_slot([key for key, *_ in rate_limits._limits(provider, 100)])
    resources = leases.resources_for(workload)
    assert len(resources) == 2
    assert one_slot(leases._keys(resources))
    # Different providers' keys are spread over slots: the tag is not one constant.
    assert not one_slot(breaker._keys(1) + breaker._keys(2))


@pytest.fixture
def refusing(redis_conn, caplog):
    """Make `key` the wrong type for its script, and collect the errors logged."""
    caplog.set_level(logging.ERROR, logger="jobs.flow")

    def make(key: str) -> None:
        redis_conn.delete(key)
        redis_conn.sadd(key, "not what the script expects")

    return make


def assert_loud(caplog) -> None:
    assert any("Redis refused the script" in r.getMessage() for r in caplog.records)


def test_a_refused_breaker_script_keeps_calls_out(workload, refusing, caplog):
    provider = workload.provider
    refusing(breaker._keys(provider.pk)[0])
    permit = breaker.acquire(provider)
    assert not permit.allowed
    assert permit.until is not None
    assert_loud(caplog)


def test_a_refused_retry_budget_script_refuses_retries_not_first_calls(workload, refusing, caplog):
    provider = workload.provider
    refusing(retry_budget._keys(provider.pk)[0])
    assert not retry_budget.acquire(provider, is_retry=True).allowed
    assert retry_budget.acquire(provider, is_retry=False).allowed
    assert_loud(caplog)


def test_a_refused_rate_limit_script_makes_the_call_wait(workload, refusing, caplog):
    provider = workload.provider
    provider.rpm_limit = 60
    refusing(rate_limits._limits(provider, 1)[0][0])
    decision = rate_limits.acquire(provider, 1)
    assert not decision.allowed
    assert decision.wait_s > 0
    assert_loud(caplog)


def test_a_refused_lease_script_takes_no_slot(workload, user, refusing, caplog):
    workload.concurrency_cap = 1
    workload.save()
    job = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    resources = leases.resources_for(workload)
    refusing(leases._keys(resources)[0])
    refused = leases.acquire(job, resources)
    assert isinstance(refused, leases.Refused)
    assert "unchecked" in refused.reason
    assert "concurrency cap" in refused.reason  # the dashboard counts it as capacity
    assert_loud(caplog)


def test_redis_out_of_reach_still_fails_open(workload, settings):
    # Unchanged: with no Redis at all, flow control must not stop the queue by itself.
    from jobs import queueing

    settings.RQ_QUEUES = {name: {"URL": "redis://127.0.0.1:1/0"} for name in settings.RQ_QUEUES}
    queueing._client = None
    try:
        assert breaker.acquire(workload.provider).allowed
        assert retry_budget.acquire(workload.provider, is_retry=True).allowed
    finally:
        queueing._client = None
