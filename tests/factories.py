"""The one way the suite builds objects: users with their roles, providers, workloads, jobs
(submitted through the service, or stored directly in any state), batches, review items and API
tokens. Fixtures in tests/conftest.py are thin wrappers around these; test modules call them
directly when they need more than one of a kind or fields of their own."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from django.contrib.auth.models import Group, Permission, User

from batches import services as batch_services
from batches.models import Batch
from jobs import services
from jobs.models import ApiToken, Job, ModelPrice, Provider, Workload
from review.models import REVIEWERS_GROUP, ReviewItem

TEXT = "The quarterly meeting covered hiring and budget."

# The JSON schema of an extract workload's answer (invoices).
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "total": {"type": "number", "minimum": 0},
        "due_date": {"type": "string", "format": "date"},
    },
    "required": ["vendor", "total", "due_date"],
}

# The documented groups (README) and the permissions their data migrations give them. Tests
# that flush the database (transaction=True) lose the migrations' rows, so `role_group` builds
# a group the same way when it is missing.
ROLE_GROUPS = {
    "operator": (
        "Operators",
        {"jobs": ["view_job", "change_job"]},
    ),
    "reviewer": (
        REVIEWERS_GROUP,
        {
            "review": ["view_reviewitem", "change_reviewitem"],
            "jobs": ["view_job"],
        },
    ),
}


def role_group(role: str) -> Group:
    name, permissions = ROLE_GROUPS[role]
    group, _ = Group.objects.get_or_create(name=name)
    for app_label, codenames in permissions.items():
        group.permissions.add(
            *Permission.objects.filter(content_type__app_label=app_label, codename__in=codenames)
        )
    return group


def make_user(username: str, *, role: str | None = None, password: str | None = None) -> User:
    """A user named `username` (password ``pw-<username>-123`` unless given) in the role's group.

    Roles: None (logged in, no group), "operator", "reviewer", "reader" (may look at the review
    inbox, is no reviewer), "admin" (a superuser)."""
    password = password or f"pw-{username}-123"
    email = f"{username}@example.com"
    if role == "admin":
        return User.objects.create_superuser(username, email, password)
    user = User.objects.create_user(username, email, password)
    if role == "reader":
        user.user_permissions.add(Permission.objects.get(codename="view_reviewitem"))
    elif role is not None:
        user.groups.add(role_group(role))
    return user


def make_provider(
    base_url: str = "",
    *,
    name: str = "Test simulator",
    kind: str = Provider.Kind.SIMULATED,
    model: str | None = "sim-small",
    **fields,
) -> Provider:
    """A provider and, unless `model` is None, its price for `model` ($1 in, $2 out per Mtok)."""
    provider = Provider.objects.create(name=name, kind=kind, base_url=base_url, **fields)
    if model is not None:
        ModelPrice.objects.create(
            provider=provider,
            model=model,
            input_per_mtok=Decimal("1.00"),
            output_per_mtok=Decimal("2.00"),
        )
    return provider


def make_workload(provider: Provider, kind: str = Workload.Kind.SUMMARIZE, **fields) -> Workload:
    defaults = {
        "name": f"{kind} workload",
        "kind": kind,
        "provider": provider,
        "model": "sim-small",
        "max_output_tokens": 300,
    }
    return Workload.objects.create(**{**defaults, **fields})


def submit(workload: Workload, user: User | None = None, text: str = TEXT, **kwargs) -> Job:
    """A job submitted as a user submits one (jobs.services.do_submit_job): queued, audited,
    enqueued when the transaction commits."""
    return services.do_submit_job(workload=workload, input_text=text, user=user, **kwargs)[0]


def make_job(
    workload: Workload, status: str = Job.Status.QUEUED, *, text: str = "x", **fields
) -> Job:
    """A job row stored directly in `status`, without the services' side effects."""
    return Job.objects.create(workload=workload, input_text=text, status=status, **fields)


def csv_bytes(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


def make_batch(
    workload: Workload,
    user: User | None,
    rows: list[list[str]] | None = None,
    *,
    filename: str = "notes.csv",
    **kwargs,
) -> Batch:
    """A batch created as an upload creates one; `rows` (header first) default to two notes."""
    rows = rows if rows is not None else [["input"], ["first note"], ["second note"]]
    return batch_services.do_create_batch(
        workload=workload, filename=filename, data=csv_bytes(rows), user=user, **kwargs
    )


def make_review_item(
    job: Job, reason: str = ReviewItem.Reason.LOW_CONFIDENCE, **fields
) -> ReviewItem:
    """An open review item for `job`, stored directly (the runner's way there is `escalate`
    in tests/review/conftest.py)."""
    return ReviewItem.objects.create(job=job, reason=reason, **fields)


def make_api_token(user: User, name: str = "ci") -> ApiToken:
    """An API token of `user`, for jobs that came in with one (`Job.api_token`)."""
    token = ApiToken(user=user, name=name)
    token.set_new_key()
    token.save()
    return token


def make_token(user: User, name: str = "ci") -> str:
    """An API token for `user`; returns the key, which only its owner ever sees."""
    token = ApiToken(user=user, name=name)
    key = token.set_new_key()
    token.save()
    return key
