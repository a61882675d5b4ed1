"""The workers page (operators): worker processes, their runs and calls, in-flight calls per
provider, and draining a worker (POST, CSRF, confirmed, audited by jobs.operator)."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

from jobs import operator
from ops import fleet

app_name = "fleet"

PERMISSION = "jobs.change_job"


def _require_operator(request: HttpRequest) -> None:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied("The workers page is for operators.")


@require_GET
def workers(request: HttpRequest) -> HttpResponse:
    _require_operator(request)
    template = "jobs/workers.html"
    if request.htmx and not request.htmx.boosted:
        template += "#workers-live"
    return render(
        request,
        template,
        {
            "workers": fleet.workers(),
            "supervised": fleet.supervised_workers(),
            "providers": fleet.calls_per_provider(),
            "gone_after_s": fleet.GONE_AFTER_S,
        },
    )


@require_POST
def drain(request: HttpRequest) -> HttpResponse:
    _require_operator(request)
    name = request.POST.get("name", "").strip()[:200]
    known = {worker.name for worker in fleet.workers()}
    if name not in known:
        messages.error(request, "No such worker (it may have stopped meanwhile).")
    elif request.POST.get("action") == "resume":
        if operator.do_undrain_worker(name, actor=request.user):
            messages.success(request, f"Worker {name} takes jobs again.")
        else:
            messages.info(request, f"Worker {name} was not drained.")
    elif operator.do_drain_worker(name, actor=request.user):
        messages.success(
            request, f"Worker {name} drained: it finishes its runs and takes no new jobs."
        )
    else:
        messages.info(request, f"Worker {name} was already drained.")
    return redirect("fleet:workers")


urlpatterns = [
    path("", workers, name="workers"),
    path("drain/", drain, name="drain"),
]
