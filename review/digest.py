"""The reviewers' email: every item not announced yet, in one message."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from review.models import REVIEWERS_GROUP, ReviewItem

log = logging.getLogger(__name__)


def reviewer_emails() -> list[str]:
    users = (
        get_user_model()
        .objects.filter(is_active=True, groups__name=REVIEWERS_GROUP)
        .exclude(email="")
    )
    return sorted(set(users.values_list("email", flat=True)))


def send() -> int:
    """Mark every unannounced item as announced and mail the list. Returns how many it listed.

    Marking and selecting happen in one transaction with row locks (skipped if another digest
    holds them), so two digests running at once never list the same item twice.
    """
    now = timezone.now()
    with transaction.atomic():
        items = list(
            ReviewItem.objects.select_for_update(skip_locked=True)
            .filter(notified_at__isnull=True)
            .order_by("created_at", "id")
        )
        if not items:
            return 0
        ReviewItem.objects.filter(pk__in=[item.pk for item in items]).update(notified_at=now)
    recipients = reviewer_emails()
    if not recipients:
        log.info("review digest: %d item(s), but no reviewer has an email address", len(items))
        return len(items)
    items = list(
        ReviewItem.objects.filter(pk__in=[item.pk for item in items]).select_related(
            "job__workload"
        )
    )
    context = {
        "items": items,
        "inbox_url": settings.AIQUEUE_BASE_URL.rstrip("/") + "/review/",
        "base_url": settings.AIQUEUE_BASE_URL.rstrip("/"),
    }
    count = len(items)
    send_mail(
        subject=f"[aiqueue] {count} item{'s' if count != 1 else ''} waiting for review",
        message=render_to_string("review/digest_email.txt", context),
        from_email=None,
        recipient_list=recipients,
    )
    return count
