"""The reviewers' email: every item not announced yet, in one message."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.template.loader import render_to_string
from django.utils import timezone

from review.models import REVIEWERS_GROUP, ReviewItem

log = logging.getLogger(__name__)


def reviewer_emails() -> list[str]:
    """Everyone who may act on an item (review.roles.can_act: Reviewers and superusers) and
    has an address."""
    users = (
        get_user_model()
        .objects.filter(Q(groups__name=REVIEWERS_GROUP) | Q(is_superuser=True), is_active=True)
        .exclude(email="")
    )
    return sorted(set(users.values_list("email", flat=True)))


# E-mail backends that deliver nothing to anyone: messages go to a log, memory or nowhere.
UNDELIVERED_BACKENDS = {
    "django.core.mail.backends.console.EmailBackend": "printed to the server's log",
    "django.core.mail.backends.filebased.EmailBackend": "written to files on the server",
    "django.core.mail.backends.dummy.EmailBackend": "thrown away",
}


def nobody_told() -> str | None:
    """Why new items reach nobody by e-mail, said on the inbox; None when someone is told."""
    where = UNDELIVERED_BACKENDS.get(settings.EMAIL_BACKEND)
    if where is not None:
        return (
            f"Nobody is e-mailed about new items: messages are {where}, not sent "
            "(set AIQUEUE_EMAIL_BACKEND and its EMAIL_* settings to send them)."
        )
    if not reviewer_emails():
        return (
            "Nobody is e-mailed about new items: no reviewer has an e-mail address "
            "(add one to a reviewer's or superuser's account)."
        )
    return None


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
