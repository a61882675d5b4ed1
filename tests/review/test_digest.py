"""Reviewers get one email per burst of escalations."""

from __future__ import annotations

import django_rq
import pytest
from rq.registry import ScheduledJobRegistry

from review import notifications, tasks

pytestmark = pytest.mark.django_db(transaction=True)


def scheduled_digests() -> list[str]:
    queue = django_rq.get_queue(notifications.DIGEST_QUEUE)
    registry = ScheduledJobRegistry(queue=queue)
    return [job_id for job_id in registry.get_job_ids() if job_id.startswith("review-digest")]


def test_a_burst_of_escalations_sends_one_email(
    redis_conn, classify_workload, escalate, reviewer, second_reviewer, mailoutbox
):
    items = escalate(classify_workload, *[f"Offer {i} [[low-confidence]]" for i in range(5)])

    assert len(scheduled_digests()) == 1
    assert mailoutbox == []  # nothing is sent until the window closes

    assert tasks.send_digest() == 5

    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert sorted(message.to) == ["ravi@example.com", "rita@example.com"]
    assert "5 items waiting for review" in message.subject
    for item in items:
        assert f"/review/{item.pk}/" in message.body


def test_a_digest_lists_only_items_not_announced_before(
    redis_conn, classify_workload, escalate, reviewer, mailoutbox
):
    escalate(classify_workload, "First [[low-confidence]]")
    tasks.send_digest()
    assert tasks.send_digest() == 0  # nothing new: no second email
    redis_conn.delete(notifications.WINDOW_KEY)  # the window closed
    (later,) = escalate(classify_workload, "Second [[low-confidence]]")
    assert len(scheduled_digests()) >= 1
    tasks.send_digest()
    assert len(mailoutbox) == 2
    assert f"/review/{later.pk}/" in mailoutbox[1].body
    assert "1 item waiting" in mailoutbox[1].subject
