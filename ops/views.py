"""The dashboard page (its live regions are re-fetched one at a time: ops.dashboard) and the
spend page (ops.spend)."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from ops import dashboard as dashboard_data
from ops import spend as spend_data
from ops.stats import day_start, month_start


def dashboard(request: HttpRequest) -> HttpResponse:
    # A live region's re-fetch (static/js/live.js, the health panel's poll) renders only that
    # region; ops.dashboard builds just what it needs.
    part = dashboard_data.requested_part(request)
    template = "jobs/dashboard.html" + (f"#{part}" if part else "")
    return render(request, template, dashboard_data.context(request, part))


@require_GET
def spend(request: HttpRequest) -> HttpResponse:
    # Who spent what, user by user and token by token: the operators' page (as the workers').
    if not request.user.has_perm("jobs.change_job"):
        raise PermissionDenied("The spend page is for operators.")
    now = timezone.now()
    return render(
        request,
        "jobs/spend.html",
        {
            "tables": spend_data.tables(now),
            "day_start": day_start(now),
            "month_start": month_start(now),
        },
    )
