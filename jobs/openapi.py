"""The API's OpenAPI 3.1 document, kept by hand beside the views it describes (jobs.api,
batches.api), and the page that shows it. tests/jobs/test_openapi.py holds them together: every
route and method of the URLconf under /api/ is in the document and nothing else is, it
validates, and a schemathesis run against a live server finds no answer it does not describe.
"""

from __future__ import annotations

import copy
import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from jobs.api import IDEMPOTENCY_KEY_CHARS, LIST_LIMIT, LIST_MAX_LIMIT, allow, api_auth
from jobs.models import Job, Priority

VERSION = "1.0.0"

NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
MONEY = {
    "type": "string",
    "pattern": r"^-?[0-9]+\.[0-9]{8}$",
    "description": "US dollars, always with eight decimals.",
    "examples": ["0.00012000"],
}
CODE = {"type": "string", "format": "uuid"}
STATUS = {"type": "string", "enum": list(Job.Status.values)}
PRIORITY = {"type": "string", "enum": list(Priority.values)}


def _error(description: str, *, retry: bool = False) -> dict:
    answer: dict = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        answer["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return answer


def _json(description: str, schema: str, *, location: bool = False) -> dict:
    answer: dict = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if location:
        answer["headers"] = {
            "Location": {"description": "The job's page.", "schema": {"type": "string"}}
        }
    return answer


UNAUTHORIZED = _error("No credentials, or an unknown token.")
FORBIDDEN = _error("A session request without its CSRF token, or not yours to change.")
NOT_FOUND = _error("No such job or batch, or not one you can see.")
BAD_REQUEST = _error("The request is malformed; `error` says what to change.")
TOO_BIG = _error("The body is over the upload limit (`max_bytes`).")
SUBMIT_ANSWERS = {
    "200": _json("An earlier job with this idempotency key.", "Job", location=True),
    "202": _json("Accepted: the job is queued (or held, or scheduled).", "Job", location=True),
    "400": BAD_REQUEST,
    "401": UNAUTHORIZED,
    "403": FORBIDDEN,
    "413": TOO_BIG,
    "422": _error("The idempotency key was used for a different request (`job` names it)."),
    "429": _error("Queue full or budget exhausted: nothing was created.", retry=True),
    "503": _error("The workload is paused by an operator.", retry=True),
}
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "The same key from the same user within 24 h returns the first job (200) if the "
        "request is the same, 422 if it is not. Overrides the body's `idempotency_key`."
    ),
    "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_CHARS},
}
CODE_PARAMETER = {"name": "code", "in": "path", "required": True, "schema": CODE}
LIST_PARAMETERS = [
    {
        "name": "status",
        "in": "query",
        "description": "One status, or several separated by commas.",
        "schema": {"type": "string"},
        "examples": {"one": {"value": "succeeded"}, "several": {"value": "failed,expired"}},
    },
    {
        "name": "workload",
        "in": "query",
        "description": "Its name or id.",
        "schema": {"type": "string"},
    },
    {"name": "batch", "in": "query", "description": "The batch's code.", "schema": CODE},
    {
        "name": "created_after",
        "in": "query",
        "description": "Created at or after this time (ISO 8601).",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "created_before",
        "in": "query",
        "description": "Created before this time (ISO 8601).",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "q",
        "in": "query",
        "description": "Jobs whose input contains this text, or whose code starts with it.",
        "schema": {"type": "string", "maxLength": 200},
    },
    {
        "name": "limit",
        "in": "query",
        "description": f"Jobs per page (default {LIST_LIMIT}).",
        "schema": {"type": "integer", "minimum": 1, "maximum": LIST_MAX_LIMIT},
    },
    {
        "name": "cursor",
        "in": "query",
        "description": "`next_cursor` of the previous page. Pages stay stable under inserts.",
        "schema": {"type": "string", "minLength": 1},
    },
]
# A time left out, null or "" is no time.
TIME_FIELD = {"anyOf": [{"type": "string", "format": "date-time"}, {"const": ""}, {"type": "null"}]}
SUBMIT_FIELDS = {
    "priority": {"anyOf": [PRIORITY, {"const": ""}, {"type": "null"}]},
    "idempotency_key": {"type": "string", "maxLength": IDEMPOTENCY_KEY_CHARS},
    "deadline": {**TIME_FIELD, "description": "Expire the job if it has not started by then."},
    "start_at": {**TIME_FIELD, "description": "Not before then."},
}
WORKLOAD_REF = {
    "oneOf": [{"type": "string", "minLength": 1}, {"type": "integer", "minimum": 1}],
    "description": "The workload's name or id.",
}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "What went wrong, for a person."},
            "retry_after": {"type": "integer", "description": "Seconds (as Retry-After)."},
            "job": {**CODE, "description": "The job an idempotency key belongs to."},
            "job_status": STATUS,
            "max_bytes": {"type": "integer"},
        },
    },
    "JobSubmit": {
        "type": "object",
        "required": ["workload"],
        "examples": [{"workload": "Summaries", "input": "Summarize this note.", "priority": "low"}],
        "properties": {
            "workload": WORKLOAD_REF,
            "input": {"type": "string", "description": "For a workload with one input."},
            "fields": {
                "type": ["object", "null"],
                "additionalProperties": {"type": "string"},
                "description": "For a workload whose template names fields: one string each.",
            },
            **SUBMIT_FIELDS,
        },
    },
    "Replay": {"type": "object", "properties": SUBMIT_FIELDS},
    "Job": {
        "type": "object",
        "additionalProperties": False,
        "required": ["code", "url", "api_url", "workload", "status", "created_at"],
        "properties": {
            "code": CODE,
            "url": {"type": "string", "description": "The job's page."},
            "api_url": {"type": "string"},
            "workload": {"type": "string"},
            "status": STATUS,
            "priority": PRIORITY,
            "stage": {"type": "string"},
            "progress_percent": {"type": "integer", "minimum": 0, "maximum": 100},
            "output": {**NULLABLE_STRING, "description": "Once succeeded."},
            "confidence": {"type": ["number", "null"]},
            "error": NULLABLE_STRING,
            "attempts": {"type": "integer", "minimum": 0},
            "cost_usd": MONEY,
            "cost_with_chunks_usd": {
                "oneOf": [MONEY, {"type": "null"}],
                "description": "A document's cost with its chunks'.",
            },
            "cost_reserved_usd": MONEY,
            "wait_reason": NULLABLE_STRING,
            "wait_kind": {
                "type": ["string", "null"],
                "enum": [*Job.WaitKind.values, None],
                "description": "What a job set aside waits for; wait_reason says it in words.",
            },
            "resume_at": NULLABLE_TIME,
            "deadline": NULLABLE_TIME,
            "scheduled_for": NULLABLE_TIME,
            "batch": {"type": ["string", "null"], "format": "uuid"},
            "replay_of": {
                "type": ["string", "null"],
                "format": "uuid",
                "description": "The job this one replays.",
            },
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": NULLABLE_TIME,
            "finished_at": NULLABLE_TIME,
        },
    },
    "JobList": {
        "type": "object",
        "additionalProperties": False,
        "required": ["results", "next_cursor", "next"],
        "properties": {
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next_cursor": {**NULLABLE_STRING, "description": "None on the last page."},
            "next": {**NULLABLE_STRING, "description": "The next page's address."},
        },
    },
    "BatchCreate": {
        "type": "object",
        "required": ["workload", "rows"],
        "examples": [{"workload": "Summaries", "rows": [{"input": "A note."}, {"input": "More."}]}],
        "properties": {
            "workload": WORKLOAD_REF,
            "rows": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "additionalProperties": True},
                "description": "One object per row; keys map to input fields by name.",
            },
            "priority": SUBMIT_FIELDS["priority"],
            "start": {"type": "boolean", "default": True},
        },
    },
    "Batch": {
        "type": "object",
        "additionalProperties": False,
        "required": ["code", "status", "workload", "progress"],
        "properties": {
            "code": CODE,
            "url": {"type": "string"},
            "api_url": {"type": "string"},
            "jobs_url": {"type": "string"},
            "workload": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["draft", "running", "paused", "cancelled", "completed"],
            },
            "priority": PRIORITY,
            "total_rows": {"type": "integer"},
            "invalid_rows": {"type": "integer"},
            "row_errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"row": {"type": "integer"}, "error": {"type": "string"}},
                },
            },
            "file_errors": {"type": "array", "items": {"type": "string"}},
            "admission_error": NULLABLE_STRING,
            "progress": {
                "type": "object",
                "properties": {
                    name: {"type": "integer", "minimum": 0}
                    for name in (
                        "pending",
                        "in_flight",
                        "succeeded",
                        "in_review",
                        "failed",
                        "cancelled",
                        "percent",
                    )
                },
            },
            "estimated_cost_usd": MONEY,
            "spent_usd": MONEY,
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": NULLABLE_TIME,
            "finished_at": NULLABLE_TIME,
        },
    },
}

PATHS = {
    "/api/jobs": {
        "get": {
            "operationId": "listJobs",
            "summary": "List and search your jobs (every job, for an operator), newest first",
            "parameters": LIST_PARAMETERS,
            "responses": {
                "200": _json("One page of jobs.", "JobList"),
                "400": BAD_REQUEST,
                "401": UNAUTHORIZED,
            },
        },
        "post": {
            "operationId": "submitJob",
            "summary": "Submit a job",
            "parameters": [IDEMPOTENCY_HEADER],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/JobSubmit"}}
                },
            },
            "responses": SUBMIT_ANSWERS,
        },
    },
    "/api/jobs/{code}": {
        "parameters": [CODE_PARAMETER],
        "get": {
            "operationId": "getJob",
            "summary": "A job's state, progress, output and cost",
            "responses": {"200": _json("The job.", "Job"), "401": UNAUTHORIZED, "404": NOT_FOUND},
        },
    },
    "/api/jobs/{code}/cancel": {
        "parameters": [CODE_PARAMETER],
        "post": {
            "operationId": "cancelJob",
            "summary": "Cancel a job that has not finished",
            "responses": {
                "200": _json("Cancelled.", "Job"),
                "401": UNAUTHORIZED,
                "403": FORBIDDEN,
                "404": NOT_FOUND,
                "409": _error("The job has finished (`job_status`): not cancelled."),
            },
        },
    },
    "/api/jobs/{code}/replay": {
        "parameters": [CODE_PARAMETER],
        "post": {
            "operationId": "replayJob",
            "summary": "Run a job's input again as a new job linked to it (`replay_of`)",
            "parameters": [IDEMPOTENCY_HEADER],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Replay"}}
                },
            },
            "responses": {**SUBMIT_ANSWERS, "404": NOT_FOUND},
        },
    },
    "/api/batches": {
        "post": {
            "operationId": "createBatch",
            "summary": "Create (and by default start) a batch from rows",
            "parameters": [
                {
                    "name": name,
                    "in": "query",
                    "description": f"With a JSONL body: the batch's `{name}`.",
                    "schema": {"type": "string"},
                }
                for name in ("workload", "priority", "start")
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}},
                    "application/jsonl": {
                        "schema": {"type": "string", "description": "One row object a line."}
                    },
                },
            },
            "responses": {
                "201": _json("Created.", "Batch"),
                "400": BAD_REQUEST,
                "401": UNAUTHORIZED,
                "403": FORBIDDEN,
                "413": TOO_BIG,
                "503": _error("The workload is paused by an operator.", retry=True),
            },
        },
    },
    "/api/batches/{code}": {
        "parameters": [CODE_PARAMETER],
        "get": {
            "operationId": "getBatch",
            "summary": "A batch's progress",
            "responses": {
                "200": _json("The batch.", "Batch"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
            },
        },
    },
    "/api/batches/{code}/jobs": {
        "parameters": [CODE_PARAMETER],
        "get": {
            "operationId": "listBatchJobs",
            "summary": "A batch's jobs, paged and filtered like /api/jobs",
            "parameters": [p for p in LIST_PARAMETERS if p["name"] != "batch"],
            "responses": {
                "200": _json("One page of the batch's jobs.", "JobList"),
                "400": BAD_REQUEST,
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
            },
        },
    },
    "/api/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "The OpenAPI document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "401": UNAUTHORIZED,
            },
        }
    },
    "/api/docs": {
        "get": {
            "operationId": "docs",
            "summary": "This document as a page (for a logged-in browser)",
            "security": [{"session": []}],
            "responses": {
                "200": {"description": "The page.", "content": {"text/html": {}}},
                "302": {"description": "To the login page."},
            },
        }
    },
}

SPEC = {
    "openapi": "3.1.0",
    "info": {
        "title": "aiqueue API",
        "version": VERSION,
        "description": (
            "Submit AI jobs, follow them, list and search them, replay them, run batches. "
            "Authenticate with `Authorization: Bearer <token>` (an API token made in the admin). "
            'Every error is JSON with an `error` field; an answer that means "try later" '
            "(429, 503) carries Retry-After. Webhooks (configured by an operator) POST a signed "
            "event when a job or batch ends or a job goes to review: see docs/deploy.md."
        ),
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "token": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "sessionid"},
        },
    },
    "security": [{"token": []}, {"session": []}],
    "paths": PATHS,
}


def spec() -> dict:
    """A copy: a caller that edits it (a test, a server URL) leaves the module's alone."""
    return copy.deepcopy(SPEC)


@allow("GET", "HEAD")
@api_auth
def document(request: HttpRequest) -> HttpResponse:
    return JsonResponse(SPEC)


@allow("GET", "HEAD")
def docs_page(request: HttpRequest) -> HttpResponse:
    """The document as a plain page, rendered on the server (no script, nothing from outside)."""
    operations = []
    for path, item in PATHS.items():
        shared = item.get("parameters", [])
        for method, operation in item.items():
            if method == "parameters":
                continue
            body = operation.get("requestBody", {}).get("content", {})
            operations.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": operation["summary"],
                    "parameters": [*shared, *operation.get("parameters", [])],
                    "body": {kind: _schema_text(media) for kind, media in body.items()},
                    "responses": operation["responses"],
                }
            )
    schemas = {name: json.dumps(schema, indent=2) for name, schema in SCHEMAS.items()}
    return render(
        request,
        "api/docs.html",
        {"info": SPEC["info"], "operations": operations, "schemas": schemas},
    )


def _schema_text(media: dict) -> str:
    schema = media.get("schema", {})
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    return schema.get("description", json.dumps(schema))
