"""Budget alerts end to end: submissions reach a budget's alert threshold, the operators are
e-mailed and a webhook receiver on localhost is told, by the real webhook worker, once per
period."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.core.management import call_command

from jobs import budget_alerts, services, webhooks
from jobs.flow import budgets
from jobs.models import Budget, Webhook, WebhookDelivery
from tests.factories import make_user

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = "Quarterly meeting: hiring plan, budget review, office move."


@pytest.fixture
def alerting(workload, settings):
    """A budget with room for 4 jobs that alerts at half of it, one operator with an address."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.AIQUEUE_WEBHOOK_RETRY_DELAYS = [0]
    operator = make_user("olga", role="operator")
    operator.email = "olga@example.com"
    operator.save()
    make_user("rita", role="reviewer")  # a reviewer is not told of budgets
    nanos = budgets.estimate(workload, TEXT).nanos * 4
    cap = (Decimal(nanos) / 10**9).quantize(Decimal("0.0001"), rounding=ROUND_DOWN)
    return Budget.objects.create(name="monthly", cap_usd=cap, alert_threshold=0.5)


def submit(workload, user):
    return services.do_submit_job(workload=workload, input_text=TEXT, user=user)[0]


def deliver_all() -> None:
    call_command("webhook_worker", "--burst")


def test_crossing_the_threshold_tells_the_operators_and_webhooks_once_per_period(
    redis_conn, workload, user, alerting, receiver
):
    target = receiver()
    hook = Webhook(name="finance", url=target.url)
    hook.set_new_secret()
    hook.save()
    webhooks.forget_cache()

    submit(workload, user)  # 25 %: under the line
    deliver_all()
    assert mail.outbox == []
    assert target.received == []

    submit(workload, user)  # 50 %: the line
    submit(workload, user)  # 75 %: already told this period
    deliver_all()
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["olga@example.com"]
    assert "budget monthly" in message.subject
    assert f"/admin/jobs/budget/{alerting.pk}/change/" in message.body
    bodies = [json.loads(r["body"]) for r in target.received]
    assert [b["event"] for b in bodies] == ["budget.alert"]
    assert bodies[0]["budget"]["name"] == "monthly"
    assert bodies[0]["budget"]["scope"] == "global"
    assert bodies[0]["budget"]["used_fraction"] >= 0.5
    assert WebhookDelivery.objects.get().status == "delivered"
    alerting.refresh_from_db()
    assert alerting.alerted_at is not None

    # As if all that was last month: a new period starts, its spend from 0, and it may alert.
    last_month = timedelta(days=40)
    Budget.objects.filter(pk=alerting.pk).update(
        period_start=alerting.period_start - last_month,
        alerted_at=alerting.alerted_at - last_month,
    )
    budgets.roll_periods()
    Budget.objects.filter(pk=alerting.pk).update(reserved_nanos=0)
    submit(workload, user)
    submit(workload, user)
    deliver_all()
    assert len(mail.outbox) == 2
    assert [json.loads(r["body"])["event"] for r in target.received] == ["budget.alert"] * 2


def test_of_two_claims_at_the_line_one_alerts(workload, alerting):
    Budget.objects.filter(pk=alerting.pk).update(reserved_nanos=alerting.cap_nanos)
    assert budgets.claim_alert(alerting.pk) is True
    assert budgets.claim_alert(alerting.pk) is False


def test_a_budget_under_its_line_or_without_a_cap_never_alerts(workload, alerting):
    Budget.objects.filter(pk=alerting.pk).update(reserved_nanos=alerting.cap_nanos // 3)
    assert budgets.claim_alert(alerting.pk) is False
    zero = Budget.objects.create(name="zero", cap_usd=Decimal(0))
    assert budgets.claim_alert(zero.pk) is False


def test_nobody_with_an_address_means_no_mail_and_a_warning(alerting, caplog):
    assert budget_alerts.operator_emails() == ["olga@example.com"]
    User.objects.update(email="")
    assert budget_alerts.send_email(alerting.pk) == 0
    assert mail.outbox == []
    assert "no operator has an e-mail address" in caplog.text
