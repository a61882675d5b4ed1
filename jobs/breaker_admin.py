"""The circuit breaker on the Provider admin page: its state and history, and a reset button.

Kept out of jobs/admin.py so the provider admin only names the mixin. The reset is a POST
(CSRF-checked by the admin), needs the change_provider permission, and is written to Django's
admin log (LogEntry) like any other change.
"""

from __future__ import annotations

import redis
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from jobs import operator
from jobs.flow import breaker
from jobs.models import Provider

STATE_COLOURS = {breaker.CLOSED: "#1e824c", breaker.OPEN: "#c0392b", breaker.HALF_OPEN: "#d35400"}


def _when(value) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S") if value else "—"


class BreakerAdminMixin:
    """For ProviderAdmin: `breaker_status` (a read-only field), a reset action and button."""

    @admin.display(description="Circuit breaker")
    def breaker_status(self, obj: Provider) -> str:
        if not obj.pk:
            return "—"
        try:
            status = breaker.status(obj)
        except redis.RedisError as exc:
            return f"unknown (Redis unavailable: {exc})"
        rate = "—" if status.failure_rate is None else f"{status.failure_rate:.0%}"
        summary = format_html(
            '<strong style="color:{}">{}</strong> · {} consecutive failures · failure rate {} of '
            "the last {} calls (opens at {} from {} calls)",
            STATE_COLOURS.get(status.state, "inherit"),
            status.state.replace("_", "-"),
            status.failures,
            rate,
            status.window_calls,
            f"{obj.breaker_failure_rate:.0%}",
            obj.breaker_min_calls,
        )
        if status.state == breaker.HALF_OPEN:
            summary = format_html(
                "{} · {} of {} probes succeeded",
                summary,
                status.probe_successes,
                obj.breaker_probe_successes,
            )
        if status.state != breaker.CLOSED:
            summary = format_html(
                "{} · opened {} · probe at {}",
                summary,
                _when(status.opened_at),
                _when(status.probe_at),
            )
        if not status.history:
            return format_html("{}<br>No transitions yet.", summary)
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{} → {}</td><td>{}</td></tr>",
            (
                (_when(e["at"]), e.get("from", ""), e.get("to", ""), e.get("reason", ""))
                for e in status.history
            ),
        )
        return format_html(
            "{}<table><thead><tr><th>when</th><th>transition</th><th>why</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            summary,
            rows,
        )

    @admin.action(description="Reset the circuit breaker of the selected providers")
    def reset_breakers(self, request: HttpRequest, queryset) -> None:
        for provider in queryset:
            self._reset(request, provider)

    def get_urls(self):
        urls = super().get_urls()
        view = self.admin_site.admin_view(require_POST(self.reset_breaker_view))
        return [
            path(
                "<path:object_id>/reset-breaker/",
                view,
                name="jobs_provider_reset_breaker",
            ),
            *urls,
        ]

    def reset_breaker_view(self, request: HttpRequest, object_id: str):
        provider = get_object_or_404(Provider, pk=object_id)
        if not self.has_change_permission(request, provider):
            raise PermissionDenied
        self._reset(request, provider)
        return HttpResponseRedirect(reverse("admin:jobs_provider_change", args=[provider.pk]))

    def _reset(self, request: HttpRequest, provider: Provider) -> None:
        previous, woken = operator.reset_breaker(provider, by=request.user.get_username())
        outcome = f"(was {previous}); {woken} job(s) woken."
        self.log_change(request, provider, f"Reset the circuit breaker {outcome}")
        messages.success(request, f"Circuit breaker of {provider} reset {outcome}")
