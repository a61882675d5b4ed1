"""Out of credit is not an outage: a provider whose account has no credit left waits for a person.

A quota or billing answer (`providers.base.OutOfCredit`: OpenAI's 429 `insufficient_quota`,
Anthropic's `billing_error`) fails every call until someone pays. Retrying it only burns the
job's attempts and feeds the breaker, and the breaker's probe would "recover" nothing. So:

- the first such answer marks the provider out of credit (`Provider.out_of_credit_since` and
  the provider's own words, one conditional UPDATE: one process wins, and it alone notifies);
- the job whose call got it is held (running → held, its reservation given back), and so is
  every job of that provider that reaches admission afterwards, without calling;
- operators are told: a banner and the provider's row on the dashboard, an email to everyone
  who may change providers, an ERROR in the log;
- `clear()` (the dashboard's "Credit added" button, the provider admin's action) unmarks it
  and releases the held jobs through `services.do_release_held`, which reserves their budgets
  again; until then `release_held` leaves them alone, so a freed budget does not wake them
  only to hold them again.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from jobs import services
from jobs.models import Job, Provider
from jobs.providers.base import OutOfCredit

log = logging.getLogger(__name__)


def hold_reason(provider: Provider) -> str:
    return (
        f"provider {provider.name!r} is out of credit (quota or billing); held until an "
        "operator adds credit and clears it"
    )


def mark(provider: Provider, error: OutOfCredit) -> bool:
    """Record that `provider` answered out of credit. Returns whether this call did (the
    first since it was last cleared); that caller notifies the operators."""
    now = timezone.now()
    marked = Provider.objects.filter(pk=provider.pk, out_of_credit_since__isnull=True).update(
        out_of_credit_since=now, out_of_credit_reason=error.message[:300]
    )
    provider.out_of_credit_since = provider.out_of_credit_since or now
    provider.out_of_credit_reason = provider.out_of_credit_reason or error.message[:300]
    if marked:
        log.error("provider %s is out of credit: %s", provider.name, error.message)
        transaction.on_commit(lambda: notify(provider), robust=True)
    return bool(marked)


def notify(provider: Provider) -> int:
    """Mail everyone who may change providers (they are the ones who can fix it). Returns
    how many were mailed."""
    users = (
        get_user_model()
        .objects.filter(
            Q(is_superuser=True)
            | Q(user_permissions__codename="change_provider")
            | Q(groups__permissions__codename="change_provider"),
            is_active=True,
        )
        .exclude(email="")
        .distinct()
    )
    recipients = sorted(set(users.values_list("email", flat=True)))
    if not recipients:
        return 0
    held = Job.objects.filter(status=Job.Status.HELD, workload__provider=provider).count()
    base = settings.AIQUEUE_BASE_URL.rstrip("/")
    send_mail(
        subject=f"[aiqueue] provider {provider.name} is out of credit",
        message=(
            f"{provider.name} answered that its account has no credit left:\n\n"
            f"    {provider.out_of_credit_reason}\n\n"
            f"Its jobs are held ({held} so far) and no call is made to it. Add credit with "
            f"the provider, then press 'Credit added' on the dashboard ({base}/) to resume "
            "them.\n"
        ),
        from_email=None,
        recipient_list=recipients,
    )
    return len(recipients)


def is_out_of_credit(provider: Provider) -> bool:
    return provider.out_of_credit_since is not None


def clear(provider: Provider) -> int:
    """Credit was added: calls may go to `provider` again, and its held jobs that fit their
    budgets are released (the rest stay held for budget). Returns how many were released."""
    cleared = Provider.objects.filter(pk=provider.pk, out_of_credit_since__isnull=False).update(
        out_of_credit_since=None, out_of_credit_reason=""
    )
    provider.out_of_credit_since = None
    provider.out_of_credit_reason = ""
    if not cleared:
        return 0
    log.warning("provider %s: out of credit cleared; releasing its held jobs", provider.name)
    return services.do_release_held()


def hold_run(job: Job, token, provider: Provider, error: OutOfCredit) -> str:
    """The run's call answered out of credit: mark the provider and hold the job (its
    reservation is given back). Returns the reason; the caller ends the run."""
    mark(provider, error)
    reason = hold_reason(provider)
    services.do_hold_run(job, token, reason=reason, kind=Job.WaitKind.CREDIT)
    return reason


def hold_at_admission(job: Job, provider: Provider) -> bool:
    """A queued job of a provider that is out of credit is held without calling it."""
    return services.do_hold_job(job, reason=hold_reason(provider), kind=Job.WaitKind.CREDIT)
