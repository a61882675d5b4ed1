"""Reviewers get one email per burst of escalations."""

from __future__ import annotations

import io

import django_rq
import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from rq.registry import ScheduledJobRegistry

from review import notifications, tasks

pytestmark = pytest.mark.django_db


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


def test_the_digest_reaches_superusers_who_may_act_on_items(
    redis_conn, classify_workload, escalate, mailoutbox
):
    User.objects.create_superuser("admin", "admin@example.com", "pw-admin-123")
    escalate(classify_workload, "Offer [[low-confidence]]")
    assert tasks.send_digest() == 1
    assert mailoutbox[0].to == ["admin@example.com"]


def test_the_inbox_says_when_nobody_is_emailed(client, reviewer, settings):
    client.force_login(reviewer)
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    assert "Nobody is e-mailed" not in client.get("/review/").content.decode()
    settings.EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
    assert (
        "messages are printed to the server&#x27;s log" in client.get("/review/").content.decode()
    )
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    User.objects.filter(pk=reviewer.pk).update(email="")
    assert "no reviewer has an e-mail address" in client.get("/review/").content.decode()


def test_the_admin_run_creates_gets_the_address_it_is_given(db, monkeypatch):
    monkeypatch.setenv("AIQUEUE_ADMIN_PASSWORD", "pw-admin-123")
    monkeypatch.setenv("AIQUEUE_ADMIN_EMAIL", "ops@example.com")
    call_command("ensure_admin", stdout=io.StringIO())
    assert User.objects.get(username="admin").email == "ops@example.com"
