"""Admin for budgets: cap, period and policy are edited here; spent and reserved are shown,
never edited (they move only by atomic updates, see jobs.flow.budgets). Imported by
jobs.admin so that admin autodiscovery registers it."""

from __future__ import annotations

from decimal import Decimal

from django.contrib import admin
from django.db.models import Sum
from django.urls import reverse
from django.utils.html import format_html

from jobs.flow import budgets
from jobs.models import Attempt, Budget


def _usd(budget: Budget, amount: Decimal) -> str:
    """'—' on the add form (nothing is spent yet), and never '0E-8'."""
    return "—" if budget.pk is None else budgets.usd_text(amount)


# Shown, never edited: they move only by atomic updates (jobs.flow.budgets).
THIS_PERIOD = ["period_began", "spent", "reserved", "remaining", "usage", "alerted", "ledger"]


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "scope",
        "period",
        "cap_usd",
        "spent",
        "reserved",
        "remaining",
        "usage",
        "on_exhausted",
    ]
    list_filter = ["period", "on_exhausted"]
    search_fields = ["name", "workload__name", "user__username", "api_token__name", "model"]
    list_select_related = ["workload", "user", "api_token"]
    fieldsets = [
        (None, {"fields": ["name", "period", "cap_usd", "alert_threshold", "on_exhausted"]}),
        (
            "Scope",
            {
                "fields": ["workload", "user", "api_token", "model"],
                "description": "Which jobs count against this budget: those that match every "
                "scope set here. Leave all empty for a global budget.",
            },
        ),
        (
            "This period",
            {"fields": THIS_PERIOD},
        ),
    ]
    readonly_fields = THIS_PERIOD

    @admin.display(description="alert sent")
    def alerted(self, obj: Budget) -> str:
        # Operators are e-mailed and webhooks told once per period (jobs.budget_alerts).
        if obj.alerted_at is None or obj.alerted_at < obj.period_start:
            return "not this period"
        return budgets.local_time_text(obj.alerted_at)

    @admin.display(description="scope")
    def scope(self, obj: Budget) -> str:
        return obj.scope_text

    @admin.display(description="period start")
    def period_began(self, obj: Budget) -> str:
        if obj.pk is None:
            return "when the budget is saved"
        return budgets.local_time_text(obj.period_start)

    @admin.display(description="spent (USD)")
    def spent(self, obj: Budget) -> str:
        return _usd(obj, obj.spent_usd)

    @admin.display(description="reserved (USD)")
    def reserved(self, obj: Budget) -> str:
        return _usd(obj, obj.reserved_usd)

    @admin.display(description="remaining (USD)")
    def remaining(self, obj: Budget) -> str:
        return _usd(obj, obj.remaining_usd)

    @admin.display(description="used")
    def usage(self, obj: Budget) -> str:
        if obj.pk is None:
            return "—"  # the add form: nothing is used yet (not "100 % (alert)" of a 0 cap)
        percent = f"{obj.used_fraction * 100:.0f}%"
        if obj.is_alerting:
            return format_html('<strong style="color:#c0392b">{} (alert)</strong>', percent)
        return percent

    @admin.display(description="attempts this period (ledger)")
    def ledger(self, obj: Budget) -> str:
        if obj.pk is None:
            return "—"
        attempts = Attempt.objects.filter(started_at__gte=obj.period_start)
        if obj.workload_id:
            attempts = attempts.filter(job__workload_id=obj.workload_id)
        if obj.user_id:
            attempts = attempts.filter(job__submitted_by_id=obj.user_id)
        if obj.api_token_id:
            attempts = attempts.filter(job__api_token_id=obj.api_token_id)
        if obj.model:
            attempts = attempts.filter(model=obj.model)
        total = attempts.aggregate(n=Sum("cost"))["n"] or Decimal(0)
        url = reverse("admin:jobs_attempt_changelist")
        return format_html(
            '{} attempt(s), {} USD — <a href="{}?started_at__gte={}">see the ledger</a>',
            attempts.count(),
            budgets.usd_text(total),
            url,
            obj.period_start.strftime("%Y-%m-%d %H:%M:%S"),
        )
