"""JSON API for programs: POST /api/jobs, GET /api/jobs/<code>, POST /api/jobs/<code>/cancel.

Auth: `Authorization: Bearer <token>` (an ApiToken made in the admin), or the browser session.
Token requests are exempt from CSRF (no cookie is involved); session requests are not.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.csrf import csrf_exempt

from jobs import documents, kinds, services
from jobs.models import ApiToken, Job, Workload
from jobs.views import can_change_job, visible_jobs

# `ApiToken.last_used_at` is kept to the minute.
TOKEN_USE_RESOLUTION = timedelta(minutes=1)


def error(status: int, message: str, **extra) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def allow(*methods: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Like Django's require_http_methods, but the 405 is JSON, as every API error is."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if request.method not in methods:
                response = error(
                    405, f"{request.method} is not allowed here; use {' or '.join(methods)}."
                )
                response["Allow"] = ", ".join(methods)
                return response
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


def api_auth(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_not_required
    @csrf_exempt
    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            try:
                # get(), not first(): the digest is unique, and first() compiles an ORDER BY
                # on every request (a third of a submission's CPU went on two of them).
                token = ApiToken.objects.select_related("user").get(
                    digest=ApiToken.hash_key(header[7:].strip()), user__is_active=True
                )
            except ApiToken.DoesNotExist:
                return error(401, "Invalid API token.")
            now = timezone.now()
            if token.last_used_at is None or now - token.last_used_at > TOKEN_USE_RESOLUTION:
                # Not a write per request: a burst of submissions would queue behind it.
                ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
            request.user = token.user
        elif request.user.is_authenticated:
            rejected = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(
                request, None, (), {}
            )
            if rejected is not None:
                return error(403, "CSRF check failed.")
        else:
            return error(401, "Authentication required: send 'Authorization: Bearer <token>'.")
        return view(request, *args, **kwargs)

    return wrapped


def job_json(request: HttpRequest, job: Job) -> dict:
    return {
        "code": str(job.code),
        "url": request.build_absolute_uri(job.get_absolute_url()),
        "api_url": request.build_absolute_uri(f"/api/jobs/{job.code}"),
        "workload": job.workload.name,
        "status": job.status,
        "priority": job.priority,
        "stage": job.stage,
        "progress_percent": job.progress_percent,
        "output": job.output_text if job.status == Job.Status.SUCCEEDED else None,
        "confidence": job.confidence,
        "error": job.error or None,
        "attempts": job.attempt_count,
        "cost_usd": str(job.cost_actual),
        # A document's own calls are its reduce call; its chunks' calls are theirs (as on its page).
        "cost_with_chunks_usd": (
            str(job.total_cost) if documents.is_document_parent(job) else None
        ),
        "cost_reserved_usd": str(job.cost_reserved),
        "wait_reason": job.wait_reason or None,
        "resume_at": job.resume_at.isoformat() if job.resume_at else None,
        "deadline": job.deadline.isoformat() if job.deadline else None,
        "scheduled_for": job.scheduled_for.isoformat() if job.scheduled_for else None,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


@allow("POST")
@api_auth
def submit(request: HttpRequest) -> HttpResponse:
    try:
        body = json.loads(request.body or b"{}")
    except RequestDataTooBig:
        # Said in JSON, not as Django's HTML error page: the client is a program.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return error(413, f"Body too large: at most {limit:,} bytes.", max_bytes=limit)
    except ValueError:
        return error(400, "Body must be a JSON object.")
    if not isinstance(body, dict):
        return error(400, "Body must be a JSON object.")
    workload_ref = body.get("workload")
    if not workload_ref:
        return error(400, "Field 'workload' is required (its name or id).")
    lookup = {"pk": workload_ref} if isinstance(workload_ref, int) else {"name": workload_ref}
    try:
        workload = Workload.objects.select_related("provider").get(**lookup)
    except Workload.DoesNotExist:
        return error(400, f"Unknown workload {workload_ref!r}.")
    try:
        input_text, input_data = _job_input(workload, body)
    except ValueError as exc:
        return error(400, str(exc))
    key = request.headers.get("Idempotency-Key") or body.get("idempotency_key") or ""
    try:
        deadline = _parse_time(body, "deadline")
        start_at = _parse_time(body, "start_at")
    except ValueError as exc:
        return error(400, str(exc))
    try:
        job, created = services.do_submit_job(
            workload=workload,
            input_text=input_text,
            input_data=input_data,
            user=request.user,
            priority=str(body.get("priority") or ""),
            idempotency_key=str(key),
            deadline=deadline,
            start_at=start_at,
        )
    except services.Overloaded as exc:
        # Queue full or budget exhausted: nothing was created; the client may come back later.
        response = error(429, str(exc), retry_after=exc.retry_after)
        response["Retry-After"] = str(exc.retry_after)
        return response
    except services.SubmitError as exc:
        return error(400, str(exc))
    response = JsonResponse(job_json(request, job), status=202 if created else 200)
    response["Location"] = job.get_absolute_url()
    return response


def _job_input(workload: Workload, body: dict) -> tuple[str, dict[str, str] | None]:
    """(input_text, input_data) from the body: `input` (a string) for a workload with one
    input, `fields` (an object with a string per named field of its template) otherwise, as
    the form asks for them. Raises ValueError with a message for the client."""
    if workload.kind == Workload.Kind.DOCUMENT:
        raise ValueError(
            f"Workload {workload.name!r} takes a document: upload it with the form at /jobs/new/."
        )
    names = workload.input_fields
    if names == ["input"]:
        if not isinstance(body.get("input"), str):
            raise ValueError("Field 'input' is required and must be a string.")
        return body["input"], None
    fields = body.get("fields")
    expected = ", ".join(names)
    if not isinstance(fields, dict):
        raise ValueError(
            f"Workload {workload.name!r} takes named fields ({expected}): send them as "
            "'fields', an object with a string for each."
        )
    unknown = sorted(set(fields) - set(names))
    missing = [name for name in names if not str(fields.get(name) or "").strip()]
    if unknown or missing or not all(isinstance(fields.get(n), str) for n in names):
        problems = []
        if missing:
            problems.append(f"missing or empty: {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown: {', '.join(unknown)}")
        if not problems:
            problems.append("every value must be a string")
        raise ValueError(f"Fields of {workload.name!r} ({expected}): {'; '.join(problems)}.")
    values = {name: fields[name] for name in names}
    return kinds.render_input_text(values), values


def _parse_time(body: dict, name: str) -> datetime | None:
    """An ISO 8601 time with an offset (or a naive one, read in the site's time zone)."""
    raw = body.get(name)
    if raw in (None, ""):
        return None
    value = parse_datetime(str(raw)) if isinstance(raw, str) else None
    if value is None:
        raise ValueError(f"Field {name!r} must be an ISO 8601 date-time.")
    if timezone.is_naive(value):
        value = timezone.make_aware(value)
    return value


@allow("POST")
@api_auth
def cancel(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = visible_jobs(request.user).filter(code=code).first()
    if job is None:
        return error(404, "No such job.")
    if not can_change_job(request.user, job):
        return error(403, "You cannot cancel this job.")
    if not services.do_cancel_job(job, actor=request.user, reason="cancelled through the API"):
        job.refresh_from_db()
        return error(409, f"The job is {job.status}; not cancelled.", job_status=job.status)
    return JsonResponse(job_json(request, job))


@allow("GET", "HEAD")
@api_auth
def detail(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = visible_jobs(request.user).filter(code=code).first()
    if job is None:
        return error(404, "No such job.")
    return JsonResponse(job_json(request, job))


@login_not_required
def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other /api/ address: a JSON 404 naming the endpoints, not the site's HTML page."""
    return error(
        404,
        f"No such API endpoint: /api/{rest}. There are POST /api/jobs, "
        "GET /api/jobs/<code> and POST /api/jobs/<code>/cancel.",
    )
