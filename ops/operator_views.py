"""The dashboard's operator controls: POST only, CSRF-checked, permission-checked, audited (by
jobs.operator). Each answers an htmx request with the refreshed health panel (so the page does
not reload) and a plain form post with a redirect to the dashboard."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from jobs import operator
from jobs.errors import REJECTED_FORM
from jobs.models import Provider, Workload
from ops import dashboard

app_name = "operator"


def operator_control(permission: str) -> Callable:
    """POST only; the user needs `permission` (and to see the dashboard's health panel)."""

    def decorate(view: Callable[..., int | None]) -> Callable[..., HttpResponse]:
        @require_POST
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if not (request.user.has_perm(permission) and dashboard.can_view_health(request.user)):
                raise PermissionDenied("You may not use this control.")
            status = 200
            try:
                status = view(request, *args, **kwargs) or 200  # a rejected form says 400
            except operator.OperatorError as exc:
                messages.error(request, str(exc))
            dashboard.forget_snapshots()
            return panel_or_redirect(request, status)

        return wrapped

    return decorate


def panel_or_redirect(request: HttpRequest, status: int = 200) -> HttpResponse:
    if request.htmx:
        return render(
            request,
            "jobs/dashboard.html#dashboard-live",
            dashboard.context(request, "dashboard-live"),
            status=status,
        )
    if status == REJECTED_FORM:  # the page again, with the form's errors, as every form does
        return render(
            request, "jobs/dashboard.html", dashboard.context(request, None), status=status
        )
    return redirect("dashboard")


@operator_control("jobs.change_workload")
def pause_workload(request: HttpRequest, pk: int) -> None:
    workload = get_object_or_404(Workload, pk=pk)
    if operator.do_pause_workload(workload, actor=request.user):
        messages.success(request, f"{workload.name} paused: its queued jobs wait until resumed.")
    else:
        messages.info(request, f"{workload.name} was already paused.")


@operator_control("jobs.change_workload")
def resume_workload(request: HttpRequest, pk: int) -> None:
    workload = get_object_or_404(Workload, pk=pk)
    if operator.do_resume_workload(workload, actor=request.user):
        messages.success(request, f"{workload.name} resumed.")
    else:
        messages.info(request, f"{workload.name} was not paused.")


@operator_control("jobs.change_job")
def cancel_low_priority(request: HttpRequest, pk: int) -> None:
    workload = get_object_or_404(Workload, pk=pk)
    cancelled = operator.do_cancel_low_priority(workload, actor=request.user)
    messages.success(
        request, f"Cancelled {cancelled} low-priority job(s) of {workload.name} not yet started."
    )


@operator_control("jobs.change_job")
def release_held(request: HttpRequest) -> None:
    released = operator.do_release_held(actor=request.user)
    messages.success(request, f"Released {released} held job(s) that fit their budgets now.")


@operator_control("jobs.change_provider")
def reset_breaker(request: HttpRequest, pk: int) -> None:
    provider = get_object_or_404(Provider, pk=pk)
    previous = operator.do_reset_breaker(provider, actor=request.user)
    messages.success(request, f"Breaker of {provider.name} closed (it was {previous}).")


@operator_control("jobs.change_provider")
def clear_credit(request: HttpRequest, pk: int) -> None:
    provider = get_object_or_404(Provider, pk=pk)
    released = operator.do_clear_out_of_credit(provider, actor=request.user)
    messages.success(request, f"{provider.name}: credit cleared; {released} held job(s) released.")


def _rate(label: str) -> forms.FloatField:
    return forms.FloatField(label=label, min_value=0.0, max_value=1.0, required=False)


class SimulatorFaultsForm(forms.Form):
    latency_ms = forms.IntegerField(label="Latency (ms)", min_value=0, max_value=120_000)
    error_rate = forms.FloatField(label="Error rate (0-1)", min_value=0.0, max_value=1.0)
    # The real APIs' failure shapes (simulator/server.py); blank leaves them as they are.
    overloaded_rate = _rate("Overloaded rate (Anthropic 529)")
    refusal_rate = _rate("Refusal rate")
    mid_stream_error_rate = _rate("Mid-stream error rate")
    quota_exhausted = forms.BooleanField(label="Out of credit (quota / billing)", required=False)


@operator_control("jobs.change_provider")
def simulator_faults(request: HttpRequest) -> int | None:
    action = request.POST.get("action", "")
    if action == "outage-on":
        faults = {"outage": True}
    elif action == "outage-off":
        faults = dict(operator.ALL_CLEAR)
    else:
        form = SimulatorFaultsForm(request.POST)
        if not form.is_valid():
            errors = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
            messages.error(request, f"Not applied: {errors}")
            return REJECTED_FORM
        faults = {k: v for k, v in form.cleaned_data.items() if v is not None}
    operator.do_set_simulator_faults(faults, actor=request.user)
    described = ", ".join(f"{key} = {value}" for key, value in sorted(faults.items()))
    messages.success(request, f"Simulator: {described}.")


urlpatterns = [
    path("workloads/<int:pk>/pause/", pause_workload, name="pause-workload"),
    path("workloads/<int:pk>/resume/", resume_workload, name="resume-workload"),
    path("workloads/<int:pk>/cancel-low/", cancel_low_priority, name="cancel-low-priority"),
    path("held/release/", release_held, name="release-held"),
    path("providers/<int:pk>/reset-breaker/", reset_breaker, name="reset-breaker"),
    path("providers/<int:pk>/clear-credit/", clear_credit, name="clear-credit"),
    path("simulator/", simulator_faults, name="simulator-faults"),
]
