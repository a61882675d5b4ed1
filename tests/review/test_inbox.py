"""The inbox's filters and sort, and 'work the queue' when nothing is left."""

from __future__ import annotations

import pytest
from django.urls import reverse

from jobs.models import Job
from review import services
from review.models import ReviewItem
from tests.helpers import unnamed_filter_fields

pytestmark = pytest.mark.django_db


def listed(client, **params) -> list[int]:
    response = client.get(reverse("review:inbox"), params)
    assert response.status_code == 200
    return [item.pk for item in response.context["page"]]


def test_inbox_filters_by_reason_workload_and_claim_and_sorts_by_confidence(
    redis_conn, classify_workload, extract_workload, escalate, reviewer, second_reviewer, client
):
    low_a, low_b = escalate(
        classify_workload, "Pills [[low-confidence]]", "Spam? [[low-confidence]]"
    )
    [invalid] = escalate(extract_workload, "Invoice 7 [[invalid-json]]")
    # The second low-confidence answer is less sure than the first.
    Job.objects.filter(pk=low_b.job_id).update(confidence=0.1)
    assert services.do_claim(low_a, reviewer)
    assert services.do_claim(invalid, second_reviewer)
    client.force_login(reviewer)

    assert listed(client) == [low_a.pk, low_b.pk, invalid.pk]  # oldest first
    assert listed(client, reason=ReviewItem.Reason.LOW_CONFIDENCE) == [low_a.pk, low_b.pk]
    assert listed(client, reason=ReviewItem.Reason.INVALID_OUTPUT) == [invalid.pk]
    assert listed(client, workload=extract_workload.pk) == [invalid.pk]
    assert listed(client, claim="mine") == [low_a.pk]
    assert listed(client, claim="claimed") == [low_a.pk, invalid.pk]
    assert listed(client, claim="unclaimed") == [low_b.pk]
    # Lowest confidence first; an answer with none at all (invalid JSON) comes before any.
    assert listed(client, sort="confidence") == [invalid.pk, low_b.pk, low_a.pk]
    # Filters combine, and the counts above the list stay those of the whole inbox.
    response = client.get(reverse("review:inbox"), {"reason": "low_confidence", "claim": "mine"})
    assert [i.pk for i in response.context["page"]] == [low_a.pk]
    assert response.context["total_open"] == 3


def test_work_the_queue_with_nothing_left_says_all_clear(redis_conn, reviewer, client):
    client.force_login(reviewer)
    response = client.get(reverse("review:next"), follow=True)
    assert response.redirect_chain == [(reverse("review:inbox"), 302)]
    assert "All clear: nothing is waiting for review." in response.content.decode()


def test_inbox_filters_have_accessible_names(redis_conn, reviewer, client):
    client.force_login(reviewer)
    body = client.get(reverse("review:inbox")).content.decode()
    assert unnamed_filter_fields(body) == []


def test_a_bad_filter_value_is_named_and_ignored_and_the_others_apply(
    redis_conn, classify_workload, extract_workload, escalate, reviewer, client
):
    [low] = escalate(classify_workload, "Pills [[low-confidence]]")
    escalate(extract_workload, "Invoice 7 [[invalid-json]]")
    client.force_login(reviewer)

    response = client.get(
        reverse("review:inbox"), {"reason": "low_confidence", "workload": "999", "claim": "x"}
    )

    assert [item.pk for item in response.context["page"]] == [low.pk]  # the reason applies
    page = response.content.decode()
    assert "Workload: Select a valid choice." in page
    assert "Claim: Select a valid choice." in page
    assert page.count("This filter is ignored.") == 2
