"""Reviewers act; readers read; everyone else gets 403 (and anonymous users the login page)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User
from django.urls import reverse

from jobs.models import Job
from review.models import REVIEWERS_GROUP


@pytest.fixture
def item(db, redis_conn, classify_workload, escalate):
    return escalate(classify_workload, "Pills [[low-confidence]]")[0]


def test_anonymous_users_are_sent_to_log_in(item, client):
    response = client.get(reverse("review:inbox"))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_staff_without_review_access_get_403_everywhere(item, client, other_user):
    client.force_login(other_user)
    assert client.get(reverse("review:inbox")).status_code == 403
    assert client.get(item.get_absolute_url()).status_code == 403
    assert client.post(reverse("review:approve", args=[item.pk])).status_code == 403
    assert Job.objects.get(pk=item.job_id).status == "needs_review"


def test_readers_see_the_inbox_but_cannot_act(item, client, reader):
    client.force_login(reader)
    inbox = client.get(reverse("review:inbox"))
    assert inbox.status_code == 200
    assert f"#{item.pk}" in inbox.content.decode()
    page = client.get(item.get_absolute_url())
    assert page.status_code == 200
    assert "approve-form" not in page.content.decode()
    for name in ("approve", "claim", "retry"):
        assert client.post(reverse(f"review:{name}", args=[item.pk])).status_code == 403
    assert client.post(reverse("review:reject", args=[item.pk]), {"reason": "x"}).status_code == 403
    assert (
        client.post(reverse("review:bulk"), {"items": [item.pk], "action": "approve"}).status_code
        == 403
    )
    assert Job.objects.get(pk=item.job_id).status == "needs_review"


def test_reviewers_and_superusers_can_act(item, client, reviewer):
    client.force_login(reviewer)
    assert "approve-form" in client.get(item.get_absolute_url()).content.decode()
    assert client.post(reverse("review:claim", args=[item.pk])).status_code == 302
    boss = User.objects.create_superuser("boss", "boss@example.com", "pw-boss-123")
    client.force_login(boss)
    client.post(reverse("review:release", args=[item.pk]))  # not boss's claim: no effect
    response = client.post(reverse("review:approve", args=[item.pk]))
    assert response.status_code == 302
    # rita's live claim stops boss too: one reviewer at a time, whatever the role.
    assert Job.objects.get(pk=item.job_id).status == "needs_review"
    client.force_login(reviewer)
    client.post(reverse("review:release", args=[item.pk]))
    client.force_login(boss)
    client.post(reverse("review:approve", args=[item.pk]))
    assert Job.objects.get(pk=item.job_id).status == "succeeded"


def test_item_url_accepts_the_job_code(item, client, reviewer):
    client.force_login(reviewer)
    response = client.get(reverse("review:item-for-job", args=[item.job.code]))
    assert response.url == item.get_absolute_url()


def test_get_never_changes_state(item, client, reviewer):
    client.force_login(reviewer)
    assert client.get(reverse("review:approve", args=[item.pk])).status_code == 405
    assert Job.objects.get(pk=item.job_id).status == "needs_review"


@pytest.mark.django_db
def test_data_migration_creates_the_reviewers_group():
    group = Group.objects.get(name=REVIEWERS_GROUP)
    codenames = set(group.permissions.values_list("codename", flat=True))
    assert {"view_reviewitem", "change_reviewitem", "view_job"} <= codenames
