"""The dashboard page: its live regions are re-fetched one at a time (ops.dashboard)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from ops import dashboard as dashboard_data


def dashboard(request: HttpRequest) -> HttpResponse:
    # A live region's re-fetch (static/js/live.js, the health panel's poll) renders only that
    # region; ops.dashboard builds just what it needs.
    part = dashboard_data.requested_part(request)
    template = "jobs/dashboard.html" + (f"#{part}" if part else "")
    return render(request, template, dashboard_data.context(request, part))
