"""JSON API for programs, v1: jobs (submit, list and search, detail, cancel, replay); batches
are in batches.api. Its document is jobs.openapi (served at /api/openapi.json, read at /api/docs);
a test holds the document and these routes to each other.

Auth: `Authorization: Bearer <token>` (an ApiToken made in the admin), or the browser session.
Token requests are exempt from CSRF (no cookie is involved); session requests are not.
Errors are `{"error": "..."}` (jobs.errors.api_error); a "try later" answer has Retry-After.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import RequestDataTooBig
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.csrf import csrf_exempt

from jobs import inputs, kinds, prepared, services
from jobs.access import can_change_job, visible_jobs
from jobs.errors import api_error, body_too_big
from jobs.forms import JobFilterForm
from jobs.models import ApiToken, Job, Priority, Provider, Workload
from jobs.representations import job_json

# `ApiToken.last_used_at` is kept to the minute.
TOKEN_USE_RESOLUTION = timedelta(minutes=1)
IDEMPOTENCY_KEY_CHARS = Job._meta.get_field("idempotency_key").max_length


error = api_error

# The submit path's two reads, written out once (jobs.prepared): `select_related("user")`
# by digest among active users, and `select_related("provider")` by name or by id.
TOKEN_WITH_USER = prepared.Select(
    [(ApiToken, None), (get_user_model(), "user")], "t0.digest = %s AND t1.is_active = %s"
)
WORKLOAD_BY_NAME = prepared.Select([(Workload, None), (Provider, "provider")], "t0.name = %s")
WORKLOAD_BY_PK = prepared.Select([(Workload, None), (Provider, "provider")], "t0.id = %s")


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

        wrapped.allowed_methods = methods  # read by the test that holds jobs.openapi to the routes
        return wrapped

    return decorator


def api_auth(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_not_required
    @csrf_exempt
    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        request.api_token = None  # the ApiToken a Bearer request came with
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            # Read on every request, never cached: a deleted token or a deactivated user is
            # refused at once.
            token = TOKEN_WITH_USER.get([ApiToken.hash_key(header[7:].strip()), True])
            if token is None:
                return error(401, "Invalid API token.")
            now = timezone.now()
            if token.last_used_at is None or now - token.last_used_at > TOKEN_USE_RESOLUTION:
                # Not a write per request: a burst of submissions would queue behind it.
                ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
            request.user = token.user
            request.api_token = token
        elif request.user.is_authenticated:
            try:  # the check reads a form-encoded body
                rejected = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(
                    request, None, (), {}
                )
            except RequestDataTooBig:
                return body_too_big()
            if rejected is not None:
                return error(403, "CSRF check failed.")
        else:
            return error(401, "Authentication required: send 'Authorization: Bearer <token>'.")
        return view(request, *args, **kwargs)

    return wrapped


def base_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/").rstrip("/")


def job_answer(request: HttpRequest, job: Job, status: int = 200) -> JsonResponse:
    return JsonResponse(job_json(job, base_url(request)), status=status)


def submitted(request: HttpRequest, submit: Callable[[], tuple[Job, bool]]) -> HttpResponse:
    """Run a submission (`services.do_submit_job` or `do_resubmit_job`) and answer it: 202 with
    the new job, 200 with the one an idempotency key found, or why not."""
    try:
        job, created = submit()
    except services.Paused as exc:
        # Nothing to do until an operator resumes it; the client may come back later.
        return error(503, str(exc), retry_after=exc.retry_after)
    except services.Overloaded as exc:
        # Queue full or budget exhausted: nothing was created; the client may come back later.
        return error(429, str(exc), retry_after=exc.retry_after)
    except services.IdempotencyConflict as exc:
        return error(422, str(exc), job=str(exc.job.code))
    except services.SubmitError as exc:
        return error(400, str(exc))
    response = job_answer(request, job, status=202 if created else 200)
    response["Location"] = job.get_absolute_url()
    return response


def json_body(request: HttpRequest) -> dict:
    """The body as a JSON object (an empty body reads as {}); raises InvalidInput."""
    body = inputs.load_json(request.body or b"{}")
    if not isinstance(body, dict):
        raise inputs.InvalidInput("Body must be a JSON object.")
    return body


@login_not_required
@csrf_exempt  # api_auth checks a session request's CSRF token
@allow("GET", "HEAD", "POST")
def jobs(request: HttpRequest) -> HttpResponse:
    """/api/jobs: GET lists and searches, POST submits."""
    return submit(request) if request.method == "POST" else job_list(request)


@api_auth
def submit(request: HttpRequest) -> HttpResponse:
    try:
        body = json_body(request)
    except RequestDataTooBig:
        return body_too_big()  # said in JSON: the client is a program
    except inputs.InvalidInput as exc:
        return error(400, str(exc))
    try:
        workload = _workload(body)
        input_text, input_data = _job_input(workload, body)
        key = _idempotency_key(request, body)
        priority = _priority(body)
        deadline = _parse_time(body, "deadline")
        start_at = _parse_time(body, "start_at")
    except inputs.InvalidInput as exc:
        return error(400, str(exc))
    return submitted(
        request,
        lambda: services.do_submit_job(
            workload=workload,
            input_text=input_text,
            input_data=input_data,
            user=request.user,
            api_token=request.api_token,
            priority=priority,
            idempotency_key=key,
            deadline=deadline,
            start_at=start_at,
        ),
    )


# The body's text was checked by inputs.load_json; what is left is each field's type. A wrong
# type is refused, never read as something else (`"priority": []` as the default priority,
# `"workload": true` as the workload with id 1).


def _workload(body: dict) -> Workload:
    ref = body.get("workload")
    if ref is None or ref == "":
        raise inputs.InvalidInput("Field 'workload' is required (its name or id).")
    if isinstance(ref, str):
        workload = WORKLOAD_BY_NAME.get([ref])
    elif isinstance(ref, int) and not isinstance(ref, bool):
        workload = WORKLOAD_BY_PK.get([inputs.parse_id(ref, "Field 'workload'")])
    else:
        raise inputs.InvalidInput("Field 'workload' must be a workload's name or id.")
    if workload is None:
        raise inputs.InvalidInput(f"Unknown workload {ref!r}.")
    return workload


def _priority(body: dict) -> str:
    value = body.get("priority")
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise inputs.InvalidInput(
            f"Field 'priority' must be one of {', '.join(Priority.values)} (a string)."
        )
    if value not in Priority.values:  # the same words as do_submit_job's
        raise inputs.InvalidInput(f"Unknown priority {value!r}.")
    return value


def _idempotency_key(request: HttpRequest, body: dict) -> str:
    """The header's key, else the body's; both are checked when both are sent."""
    header = request.headers.get("Idempotency-Key")
    field = body.get("idempotency_key", "")
    if not isinstance(field, str):
        raise inputs.InvalidInput("Field 'idempotency_key' must be a string.")
    for key, label in ((field, "Field 'idempotency_key'"), (header, "The Idempotency-Key header")):
        if key is None:
            continue
        inputs.check_text(key, label)
        if len(key.strip()) > IDEMPOTENCY_KEY_CHARS:
            # Cut short, two keys sharing their first 200 characters would find each other's job.
            raise inputs.InvalidInput(f"{label} is longer than {IDEMPOTENCY_KEY_CHARS} characters.")
    return field if header is None else header


def _job_input(workload: Workload, body: dict) -> tuple[str, dict[str, str] | None]:
    """(input_text, input_data) from the body: `input` (a string) for a workload with one
    input, `fields` (an object with a string per named field of its template) otherwise, as
    the form asks for them. Raises InvalidInput with a message for the client."""
    if workload.kind == Workload.Kind.DOCUMENT:
        raise inputs.InvalidInput(
            f"Workload {workload.name!r} takes a document: upload it with the form at /jobs/new/."
        )
    names = workload.input_fields
    fields = body.get("fields")
    if fields is not None and (
        not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values())
    ):
        raise inputs.InvalidInput("Field 'fields' must be an object: every value must be a string.")
    if names == ["input"]:
        if not isinstance(body.get("input"), str):
            raise inputs.InvalidInput("Field 'input' is required and must be a string.")
        return body["input"], None
    if not isinstance(fields, dict):
        raise inputs.InvalidInput(
            f"Workload {workload.name!r} takes named fields ({', '.join(names)}): send them as "
            "'fields', an object with a string for each."
        )
    return kinds.named_input(workload, fields)


def _parse_time(body: dict, name: str) -> datetime | None:
    """An ISO 8601 time with an offset (or a naive one, read in the site's time zone), within
    the range inputs.check_time allows."""
    raw = body.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = parse_datetime(raw) if isinstance(raw, str) else None
    except ValueError:  # well-formed but not a date, such as month 13
        value = None
    if value is None:
        raise inputs.InvalidInput(f"Field {name!r} must be an ISO 8601 date-time.")
    return inputs.check_time(value, f"Field {name!r}")


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
    return job_answer(request, job)


@allow("GET", "HEAD")
@api_auth
def detail(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    job = listed(visible_jobs(request.user)).filter(code=code).first()
    if job is None:
        return error(404, "No such job.")
    return job_answer(request, job)


@allow("POST")
@api_auth
def replay(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    """A new job with the same workload and input, linked to this one (`replay_of`). The body
    may set `priority`, `deadline`, `start_at` and `idempotency_key`, as a submission's."""
    job = visible_jobs(request.user).filter(code=code).first()
    if job is None:
        return error(404, "No such job.")
    if not can_change_job(request.user, job):
        return error(403, "You cannot replay this job.")
    try:
        body = json_body(request)
        key = _idempotency_key(request, body)
        priority = _priority(body)
        deadline = _parse_time(body, "deadline")
        start_at = _parse_time(body, "start_at")
    except RequestDataTooBig:
        return body_too_big()
    except inputs.InvalidInput as exc:
        return error(400, str(exc))
    return submitted(
        request,
        lambda: services.do_resubmit_job(
            job,
            user=request.user,
            api_token=request.api_token,
            idempotency_key=key,
            priority=priority,
            deadline=deadline,
            start_at=start_at,
        ),
    )


# --------------------------------------------------------------------------- list and search

LIST_LIMIT = 50
LIST_MAX_LIMIT = 200
LIST_FILTERS = frozenset(
    {"status", "workload", "batch", "created_after", "created_before", "q", "limit", "cursor"}
)


# Blank, these mean nothing (a blank `q` or `status` is no filter, as on the job list's form).
NOT_BLANK = frozenset({"batch", "created_after", "created_before", "limit", "cursor"})


def listed(jobs_: QuerySet[Job]) -> QuerySet[Job]:
    """What job_json reads, in the list's one query."""
    return jobs_.select_related("workload", "batch", "replay_of")


@api_auth
def job_list(request: HttpRequest) -> HttpResponse:
    return job_page(request, visible_jobs(request.user))


def job_page(request: HttpRequest, jobs_: QuerySet[Job], *, filters=LIST_FILTERS) -> HttpResponse:
    """One page of `jobs_`, newest first, filtered by the query string. The cursor names the
    last job shown, (created_at, id): a job submitted meanwhile sorts before it and never
    shifts the next page, as an offset would."""
    try:
        jobs_ = _filtered(jobs_, request.GET, filters)
        limit = _limit(request.GET.get("limit"))
        if cursor := request.GET.get("cursor"):
            created_at, pk = _read_cursor(cursor)
            jobs_ = jobs_.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=pk))
    except inputs.InvalidInput as exc:
        return error(400, str(exc))
    page = list(listed(jobs_).order_by("-created_at", "-id")[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    next_cursor = _make_cursor(page[-1]) if more else None
    base = base_url(request)
    next_url = None
    if next_cursor is not None:
        query = request.GET.copy()
        query["cursor"] = next_cursor
        next_url = f"{base}{request.path}?{query.urlencode()}"
    return JsonResponse(
        {
            "results": [job_json(job, base) for job in page],
            "next_cursor": next_cursor,
            "next": next_url,
        }
    )


def _filtered(jobs_: QuerySet[Job], query, allowed: frozenset[str]) -> QuerySet[Job]:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise inputs.InvalidInput(
            f"Unknown query parameter {unknown[0]!r}; there are {', '.join(sorted(allowed))}."
        )
    for name in query:
        if len(query.getlist(name)) > 1:
            raise inputs.InvalidInput(f"Query parameter {name!r} is given more than once.")
        inputs.check_text(query[name], f"Query parameter {name!r}")
        if name in NOT_BLANK and not query[name].strip():
            raise inputs.InvalidInput(f"Query parameter {name!r} is empty.")
    if status := query.get("status"):
        statuses = [value.strip() for value in status.split(",") if value.strip()]
        wrong = [value for value in statuses if value not in Job.Status.values]
        if wrong:
            raise inputs.InvalidInput(
                f"Unknown status {wrong[0]!r}; one of {', '.join(Job.Status.values)}, "
                "or several separated by commas."
            )
        jobs_ = jobs_.filter(status__in=statuses)
    if workload := query.get("workload"):
        # Its name, or its id: a name made of digits is found either way.
        match = Q(workload__name=workload)
        if workload.isascii() and workload.isdigit():
            match |= Q(workload_id=inputs.parse_id(workload, "Query parameter 'workload'"))
        jobs_ = jobs_.filter(match)
    if batch := query.get("batch"):
        jobs_ = jobs_.filter(batch__code=_uuid(batch, "batch"))
    for name, lookup in (
        ("created_after", "created_at__gte"),
        ("created_before", "created_at__lt"),
    ):
        if (moment := _parse_time(query, name)) is not None:
            jobs_ = jobs_.filter(**{lookup: moment})
    if text := query.get("q"):
        inputs.check_text(text, "Query parameter 'q'")
        form = JobFilterForm({"q": text})
        if not form.is_valid():
            raise inputs.InvalidInput("Query parameter 'q' is longer than 200 characters.")
        if (match := form.search()) is not None:  # None: only spaces
            jobs_ = jobs_.filter(match)
    return jobs_


def _uuid(raw: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise inputs.InvalidInput(f"Query parameter {name!r} must be a code (a UUID).") from None


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return LIST_LIMIT
    digits = raw.isascii() and raw.isdigit() and len(raw) <= 3
    if not digits or not 1 <= int(raw) <= LIST_MAX_LIMIT:
        raise inputs.InvalidInput(f"Query parameter 'limit' must be 1 to {LIST_MAX_LIMIT}.")
    return int(raw)


def _make_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[datetime, int]:
    """The cursor is opaque to clients; a damaged one is a 400, never a 500."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment_text, pk_text = raw.split("|")
        created_at = datetime.fromisoformat(moment_text)
        pk = int(pk_text)
        if created_at.tzinfo is None or not 0 < pk < 2**63:
            raise ValueError(raw)
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        raise inputs.InvalidInput("Query parameter 'cursor' is not one this API gave.") from None
    return created_at, pk


@login_not_required
@csrf_exempt  # it changes nothing; a program's POST must get this 404, not the CSRF page
def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other /api/ address: a JSON 404 naming the endpoints, not the site's HTML page."""
    return error(
        404,
        f"No such API endpoint: /api/{rest}. The endpoints are listed in /api/openapi.json "
        "and described at /api/docs.",
    )
