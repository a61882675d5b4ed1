"""The review forms against hostile input (issue 18): ids out of range, refused bulk forms."""

from __future__ import annotations

import pytest
from django.urls import reverse

from review.models import ReviewItem

LOW = "One [[low-confidence]]"

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["10000000000000000000000000000"], "An item id is out of range"),
        (["9" * 5000], "An item id is out of range"),
        (["-1"], "An item id must be a whole number"),
        (["1e5"], "An item id must be a whole number"),
        ([], "Select at least one item"),
    ],
)
def test_a_bulk_form_with_bad_ids_answers_400_on_the_inbox(
    redis_conn, classify_workload, escalate, reviewer, client, items, message
):
    (item,) = escalate(classify_workload, LOW)
    client.force_login(reviewer)
    data = {"items": items, "action": "approve", "query": "reason=low_confidence"}
    response = client.post(reverse("review:bulk"), data)
    assert response.status_code == 400
    page = response.content.decode()
    assert message in page
    assert f"review-row-{item.pk}" in page  # the inbox it came from, filters applied
    item.refresh_from_db()
    assert item.status == ReviewItem.Status.OPEN


def test_a_bulk_reject_without_a_reason_answers_400(
    redis_conn, classify_workload, escalate, reviewer, client
):
    (item,) = escalate(classify_workload, LOW)
    client.force_login(reviewer)
    response = client.post(reverse("review:bulk"), {"items": [item.pk], "action": "reject"})
    assert response.status_code == 400
    assert "Say why the outputs are rejected." in response.content.decode()
    item.refresh_from_db()
    assert item.status == ReviewItem.Status.OPEN


@pytest.mark.parametrize("name", ["item", "claim", "approve"])
def test_an_item_id_out_of_range_is_404(reviewer, client, name):
    client.force_login(reviewer)
    method = client.get if name == "item" else client.post
    assert method(reverse(f"review:{name}", args=[10**30])).status_code == 404
