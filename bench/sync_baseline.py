"""BENCHMARK ONLY: the synchronous baseline that bench/spike.py compares aiqueue against.

A view that calls the AI provider inline, inside the HTTP request, the way an app without a
queue does. It is mounted only by `bench.sync_baseline_settings` (ROOT_URLCONF below), never by
the product's urls.
"""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST

from aiqueue.urls import urlpatterns as product_urlpatterns
from jobs.api import api_auth, error
from jobs.models import Workload
from jobs.providers.base import CompletionRequest, ProviderError
from jobs.providers.registry import get_provider


@require_POST
@api_auth
def sync_submit(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    workload = Workload.objects.select_related("provider").get(name=body["workload"])
    completion_request = CompletionRequest(
        model=workload.model,
        system_prompt=workload.system_prompt,
        user_prompt=str(body.get("input", "")),
        max_output_tokens=workload.max_output_tokens,
    )
    try:
        completion = get_provider(workload.provider).complete(completion_request)
    except ProviderError as exc:
        return error(502, exc.message)
    return JsonResponse({"output": completion.text, "tokens_out": completion.tokens_out})


urlpatterns = [path("bench/sync-submit", sync_submit), *product_urlpatterns]
