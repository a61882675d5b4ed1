"""The site's error views. Under /api/ every error is JSON, whatever raised it (a bug's 500, a
CSRF refusal, a body over the upload limit, an unknown address): the client is a program.
Elsewhere they are Django's own views with the site's templates (templates/4xx.html, 500.html).
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import csrf, defaults

API_PREFIX = "/api/"
# A form shown again with its errors answers 400, on every page, whether what was typed was
# wrong or the service refused it (a full queue): htmx swaps a 400 (templates/base.html's
# htmx-config). A button's refusal (a batch that cannot start, a claim someone else holds)
# redirects with a message instead.
REJECTED_FORM = 400


def form_status(form) -> int:
    return REJECTED_FORM if form.is_bound and form.errors else 200


def is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def api_error(status: int, message: str, **extra) -> JsonResponse:
    """Every API error: `{"error": <what went wrong, for a person>, ...}` with any details as
    more fields. A "try later" answer (`retry_after`, seconds) says so in Retry-After too."""
    response = JsonResponse({"error": message, **extra}, status=status)
    if extra.get("retry_after") is not None:
        response["Retry-After"] = str(extra["retry_after"])
    return response


def body_too_big() -> JsonResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return api_error(413, f"Body too large: at most {limit:,} bytes.", max_bytes=limit)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not is_api(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return body_too_big()
    return api_error(400, "Bad request.")


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not is_api(request):
        return defaults.permission_denied(request, exception)
    return api_error(403, str(exception) or "Forbidden.")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not is_api(request):
        return defaults.page_not_found(request, exception)
    return api_error(404, f"No such API endpoint: {request.path}.")


def server_error(request: HttpRequest) -> HttpResponse:
    if not is_api(request):
        return defaults.server_error(request)
    # Nothing of the exception: it is logged (django.request), not told.
    return api_error(500, "Internal error; it has been logged.")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    if not is_api(request):
        return csrf.csrf_failure(request, reason)
    return api_error(403, "CSRF check failed: send 'Authorization: Bearer <token>' instead.")
