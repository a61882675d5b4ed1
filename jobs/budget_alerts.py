"""Budget alerts, told once per budget period (jobs.flow.budgets.claim_alert decides when):

- an e-mail to the operators (the Operators group and superusers, those with an address),
  sent by the webhook worker (`manage.py webhook_worker`), never in a run's thread or a
  request: a slow mail server delays nobody;
- a `budget.alert` webhook event (jobs.webhooks: signed, logged, retried) to the webhooks that
  follow every user's jobs, of every workload or of the budget's own.

Nothing here may fail the run or the submission that crossed the line: errors are logged.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db.models import Q
from django.dispatch import receiver
from django.urls import reverse

from jobs import webhooks
from jobs.models import Budget
from jobs.signals import budget_alert

log = logging.getLogger(__name__)

OPERATORS_GROUP = "Operators"  # jobs/migrations/0010_i18_operators_group.py


def operator_emails() -> list[str]:
    users = (
        get_user_model()
        .objects.filter(Q(groups__name=OPERATORS_GROUP) | Q(is_superuser=True), is_active=True)
        .exclude(email="")
    )
    return sorted(set(users.values_list("email", flat=True)))


def budget_json(budget: Budget) -> dict:
    base = settings.AIQUEUE_BASE_URL.rstrip("/")
    return {
        "name": budget.name,
        "scope": budget.scope_text,
        "period": budget.period,
        "period_start": budget.period_start.isoformat(),
        "cap_usd": f"{budget.cap_usd:.8f}",
        "spent_usd": f"{budget.spent_usd:.8f}",
        "reserved_usd": f"{budget.reserved_usd:.8f}",
        "used_fraction": round(budget.used_fraction, 4),
        "alert_threshold": budget.alert_threshold,
        "on_exhausted": budget.on_exhausted,
        "url": base + reverse("admin:jobs_budget_change", args=[budget.pk]),
    }


def _load(budget_id: int) -> Budget | None:
    return (
        Budget.objects.select_related("workload", "user", "api_token").filter(pk=budget_id).first()
    )


@receiver(budget_alert, dispatch_uid="budget_alerts.tell")
def tell(sender, budget_id: int, **kwargs) -> None:
    """On commit of the change that reached the threshold: the webhook events (rows first, so
    none is lost if Redis is away), then the e-mail on the webhook queue."""
    try:
        budget = _load(budget_id)
        if budget is None:
            return
        if hooks := webhooks.following(budget.user_id, budget.workload_id):
            webhooks.record(hooks, "budget.alert", {"budget": budget_json(budget)})
        webhooks.queue().enqueue(send_email, budget_id, result_ttl=0, failure_ttl=86400)
    except Exception:
        log.exception("budget alert for budget %s could not be sent", budget_id)


def send_email(budget_id: int) -> int:
    """The operators' e-mail (an RQ job on the webhook queue). Returns how many were told."""
    budget = _load(budget_id)
    recipients = operator_emails()
    if budget is None or not recipients:
        log.warning("budget alert %s: no operator has an e-mail address", budget_id)
        return 0
    data = budget_json(budget)
    send_mail(
        subject=f"[aiqueue] budget {budget.name} is at {data['used_fraction']:.0%} of its cap",
        message=(
            f"Budget {budget.name} ({budget.scope_text}, per {budget.period}) has used "
            f"{data['used_fraction']:.0%} of its cap, past its alert threshold of "
            f"{budget.alert_threshold:.0%}.\n\n"
            f"Spent {data['spent_usd']} USD, reserved {data['reserved_usd']} USD, cap "
            f"{data['cap_usd']} USD since {budget.period_start:%Y-%m-%d %H:%M %Z}.\n"
            f"When it is exhausted, new jobs are "
            f"{'held' if budget.on_exhausted == Budget.OnExhausted.HOLD else 'rejected'}.\n\n"
            f"Raise it: {data['url']}\n\n"
            "This alert is sent once per budget period."
        ),
        from_email=None,
        recipient_list=recipients,
    )
    return len(recipients)
