"""The API's batches: POST /api/batches (rows as JSON or JSONL), GET /api/batches/<code> (its
progress) and GET /api/batches/<code>/jobs (its jobs, paged like /api/jobs). A batch made here
is the one the upload form makes (batches.services), from rows instead of a file."""

from __future__ import annotations

import json
import uuid

from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

from batches import services
from batches.models import Batch
from batches.services import batch_json
from batches.views import visible_batches
from jobs import inputs
from jobs.api import (
    LIST_FILTERS,
    _priority,
    _workload,
    allow,
    api_auth,
    base_url,
    job_page,
    json_body,
)
from jobs.errors import api_error, body_too_big
from jobs.models import Job
from jobs.services import PAUSED_RETRY_AFTER

JSONL_TYPES = frozenset({"application/jsonl", "application/x-ndjson", "application/x-jsonlines"})


@allow("POST")
@api_auth
def create(request: HttpRequest) -> HttpResponse:
    """A JSON object {"workload", "rows": [{column: value}...], "priority", "start"}, or JSONL
    (one row object a line, Content-Type application/jsonl) with those as query parameters.
    Rows map to the workload's input fields by name, as an uploaded file's columns do. With
    `start` (the default) the batch starts at once; else it stays a draft for its page."""
    try:
        if request.content_type in JSONL_TYPES:
            options: dict = {name: request.GET.get(name) for name in request.GET}
            for value in options.values():
                inputs.check_text(value, "A query parameter")
            data = request.body
            if "start" in options:
                options["start"] = options["start"].lower() not in {"0", "false", "no", "off"}
        else:
            options = json_body(request)
            rows = options.get("rows")
            if not isinstance(rows, list) or not rows:
                raise inputs.InvalidInput("Field 'rows' is required: a list of row objects.")
            data = "\n".join(json.dumps(row) for row in rows).encode()
        workload = _workload(options)
        priority = _priority(options)
        start = options.get("start", True)
        if not isinstance(start, bool):
            raise inputs.InvalidInput("Field 'start' must be true or false.")
    except RequestDataTooBig:
        return body_too_big()
    except inputs.InvalidInput as exc:
        return api_error(400, str(exc))
    if start and workload.is_paused:
        return api_error(
            503,
            f"Workload {workload.name!r} is paused; try again later.",
            retry_after=PAUSED_RETRY_AFTER,
        )
    try:
        # A batch that cannot start (no row fits the workload's fields) is not left behind.
        with transaction.atomic():
            batch = services.do_create_batch(
                workload=workload,
                filename="api.jsonl",
                data=data,
                user=request.user,
                priority=priority,
                api_token=request.api_token,
            )
            if start:
                services.do_start_batch(batch)
    except services.BatchError as exc:
        return api_error(400, str(exc))
    response = JsonResponse(batch_json(batch, base_url(request)), status=201)
    response["Location"] = batch.get_absolute_url()
    return response


def _batch(request: HttpRequest, code: uuid.UUID) -> Batch | None:
    return visible_batches(request.user).filter(code=code).first()


@allow("GET", "HEAD")
@api_auth
def detail(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    batch = _batch(request, code)
    if batch is None:
        return api_error(404, "No such batch.")
    return JsonResponse(batch_json(batch, base_url(request)))


@allow("GET", "HEAD")
@api_auth
def jobs(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    """The batch's jobs (rows not admitted yet have none): visible to whoever sees the batch."""
    batch = _batch(request, code)
    if batch is None:
        return api_error(404, "No such batch.")
    return job_page(request, Job.objects.filter(batch=batch), filters=LIST_FILTERS - {"batch"})
