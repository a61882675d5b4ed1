"""Out of credit is not an outage: a quota / billing answer holds the provider's jobs until an
operator clears it, with the real worker code, Redis and the simulator over HTTP."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core import mail

from jobs import services
from jobs.models import Attempt, Job, Provider
from review.models import ReviewItem
from tests.factories import make_user, submit

pytestmark = pytest.mark.django_db

TEXT = "Quarterly meeting: hiring plan, budget review, office move."


@pytest.fixture
def admin_user(db) -> User:
    return make_user("ada", role="admin")


def test_an_out_of_credit_answer_holds_the_jobs_instead_of_retrying(
    redis_conn, simulator, workload, user, admin_user, run_worker
):
    simulator.control(quota_exhausted=True)
    jobs = [submit(workload, user, TEXT) for _ in range(3)]

    run_worker()

    # One call found out; nothing was retried, and the other jobs never called.
    assert simulator.counters()["requests_total"] == 1
    for job in jobs:
        job.refresh_from_db()
        assert job.status == "held"
        assert "out of credit" in job.wait_reason
        assert workload.provider.name in job.wait_reason
    [attempt] = Attempt.objects.all()
    assert attempt.error_class == "out_of_credit"
    assert not attempt.is_billed
    assert not ReviewItem.objects.exists()  # not a failure for a human to retry
    provider = Provider.objects.get(pk=workload.provider_id)
    assert provider.is_out_of_credit
    assert "quota" in provider.out_of_credit_reason
    # The operators who can fix it are told, once.
    [message] = mail.outbox
    assert message.to == ["ada@example.com"]
    assert "out of credit" in message.subject
    # A freed budget does not wake them only to hold them again.
    assert services.do_release_held() == 0


def test_the_dashboard_says_so_and_credit_added_resumes_the_jobs(
    redis_conn, simulator, workload, user, admin_user, run_worker, client
):
    simulator.control(quota_exhausted=True)
    jobs = [submit(workload, user, TEXT) for _ in range(2)]
    run_worker()
    client.force_login(admin_user)
    page = client.get("/").content.decode()
    assert f"{workload.provider.name} is out of credit" in page
    assert f'id="credit-alert-{workload.provider_id}"' in page
    assert "Credit added" in page

    simulator.control(quota_exhausted=False)
    response = client.post(f"/operator/providers/{workload.provider_id}/clear-credit/")
    assert response.status_code == 302
    for job in jobs:
        job.refresh_from_db()
        assert job.status == "queued"
    run_worker()
    assert set(Job.objects.values_list("status", flat=True)) == {"succeeded"}
    assert not Provider.objects.get(pk=workload.provider_id).is_out_of_credit
    assert f'id="credit-alert-{workload.provider_id}"' not in client.get("/").content.decode()
