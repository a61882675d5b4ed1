"""Every URL pattern × every role, generated from the URL resolver (issue 18).

A pattern with no rule below fails `test_every_url_pattern_has_a_rule`: a new URL is covered
the day it is added. Each cell is one request (GET, and POST for every pattern outside the
admin) inside a savepoint that is rolled back, so one cell's action does not change the next.
No cell may answer 500; each must land in its rule's outcomes:

- ok: 2xx, or a redirect elsewhere than a login page (400 counts as ok for a POST without
  data: the view let the role in and refused the empty form)
- login / admin-login: sent to the site's or the admin's login page
- 401, 403, 404, 405: what they say
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, User
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from batches import services as batch_services
from jobs import services
from jobs.models import (
    ApiToken,
    Attempt,
    Budget,
    Job,
    JobEvent,
    ModelPrice,
    Provider,
    Webhook,
    WebhookDelivery,
    Workload,
)
from review.models import ReviewItem
from tests.helpers import documented_roles

ROLES = ["anonymous", "no_group", "submitter", "reviewer", "operator", "admin"]
STAFF = {"operator", "admin"}

# --- the rules: role -> outcomes accepted -----------------------------------------------------

Rule = Callable[[str], set[str]]


def everyone(role: str) -> set[str]:
    return {"ok"}


def logged_in(role: str) -> set[str]:
    return {"login"} if role == "anonymous" else {"ok"}


def own_or_view_job(role: str) -> set[str]:
    """The submitter's object: its owner and everyone with jobs.view_job; others 404."""
    return {"anonymous": {"login"}, "no_group": {"404"}}.get(role, {"ok"})


def own_or_change_job(role: str) -> set[str]:
    """Changing the submitter's object: reviewers see it but may not change it."""
    return {"anonymous": {"login"}, "no_group": {"404"}, "reviewer": {"403"}}.get(role, {"ok"})


def operator_control(role: str) -> set[str]:
    return {"anonymous": {"login"}}.get(role, {"ok"} if role in STAFF else {"403"})


def review_reader(role: str) -> set[str]:
    if role == "anonymous":
        return {"login"}
    return {"ok"} if role in {"reviewer", "admin"} else {"403"}


def metrics(role: str) -> set[str]:
    return {"anonymous": {"401"}, "operator": {"ok"}, "admin": {"ok"}}.get(role, {"403"})


def api(inner: Rule) -> Rule:
    """The API answers 401 (JSON), never a login redirect."""
    return lambda role: {"401"} if role == "anonymous" else inner(role)


def admin_login(role: str) -> set[str]:
    # Anonymous visitors meet the site's login (LoginRequiredMiddleware) or the admin's;
    # logged-in users the admin's, which says they may not use the admin.
    return {"login", "admin-login"} if role == "anonymous" else {"admin-login"}


def staff(role: str) -> set[str]:
    """django-rq's pages: staff only; an id that names nothing is a 404, an action asked with
    GET a 405."""
    return {"ok", "404", "405"} if role in STAFF else admin_login(role)


def rq_api(role: str) -> set[str]:
    """django-rq's stats and metrics: staff, or its own API token (none is set)."""
    return {"ok"} if role in STAFF else ({"login"} if role == "anonymous" else {"401"})


def nobody(role: str) -> set[str]:
    return {"404"}


def method(allowed: set[str], rule: Rule) -> Callable[[str], Rule]:
    """`rule` for the methods the view takes; 405 for the others (once logged in: the login
    middleware runs first)."""

    def for_method(http_method: str) -> Rule:
        if http_method in allowed:
            return rule
        if allowed == GET:  # a page that changes nothing may also render for a POST
            return lambda role: rule(role) | ({"405"} if role != "anonymous" else set())
        return lambda role: {"login"} if role == "anonymous" else {"405"}

    return for_method


def get_only(rule: Rule) -> Callable[[str], Rule]:
    """A page that needs no login and takes GET only: any POST is a 405."""
    return lambda http_method: rule if http_method == "GET" else (lambda role: {"405"})


def api_method(allowed: set[str], rule: Rule) -> Callable[[str], Rule]:
    # The API's 405 comes before its authentication, for anonymous callers too.
    return lambda http_method: api(rule) if http_method in allowed else (lambda role: {"405"})


def same(rule: Rule) -> Callable[[str], Rule]:
    return lambda http_method: rule


GET, POST = {"GET"}, {"POST"}

RULES: dict[str, Callable[[str], Rule]] = {
    "": same(logged_in),
    "jobs/": same(logged_in),
    "jobs/new/": same(logged_in),
    "jobs/cancel/": method(POST, logged_in),
    "jobs/replay/": same(logged_in),
    **{f"jobs/lists/{slug}/": same(operator_control) for slug in ("scheduled", "held", "failed")},
    "jobs/<uuid:code>/": method(GET, own_or_view_job),
    "jobs/<uuid:code>/cancel/": method(POST, own_or_change_job),
    "jobs/<uuid:code>/replay/": same(own_or_change_job),
    "batches/": same(logged_in),
    "batches/new/": same(logged_in),
    "batches/<uuid:code>/": method(GET, own_or_view_job),
    "batches/<uuid:code>/results.csv": same(own_or_view_job),
    **{
        f"batches/<uuid:code>/{action}/": method(POST, own_or_change_job)
        for action in ("mapping", "start", "pause", "resume", "cancel")
    },
    **{
        f"operator/{route}": method(POST, operator_control)
        for route in (
            "workloads/<int:pk>/pause/",
            "workloads/<int:pk>/resume/",
            "workloads/<int:pk>/cancel-low/",
            "held/release/",
            "providers/<int:pk>/reset-breaker/",
            "providers/<int:pk>/clear-credit/",
            "simulator/",
        )
    },
    "operator/workers/": method(GET, operator_control),
    "operator/workers/drain/": method(POST, operator_control),
    "operator/spend/": method(GET, operator_control),
    "metrics": get_only(metrics),
    "healthz": get_only(everyone),
    "readyz": get_only(everyone),
    "review/": same(review_reader),
    "review/next/": same(review_reader),
    "review/<int:pk>/": same(review_reader),
    "review/<uuid:code>/": same(review_reader),
    **{
        f"review/{route}": method(POST, review_reader)
        for route in (
            "bulk/",
            "<int:pk>/claim/",
            "<int:pk>/release/",
            "<int:pk>/approve/",
            "<int:pk>/correct/",
            "<int:pk>/retry/",
            "<int:pk>/reject/",
        )
    },
    "api/jobs": api_method({"GET", "HEAD", "POST"}, logged_in),
    "api/jobs/<uuid:code>": api_method({"GET", "HEAD"}, own_or_view_job),
    "api/jobs/<uuid:code>/cancel": api_method(POST, own_or_change_job),
    "api/jobs/<uuid:code>/replay": api_method(POST, own_or_change_job),
    "api/batches": api_method(POST, logged_in),
    "api/batches/<uuid:code>": api_method({"GET", "HEAD"}, own_or_view_job),
    "api/batches/<uuid:code>/jobs": api_method({"GET", "HEAD"}, own_or_view_job),
    "api/openapi.json": api_method({"GET", "HEAD"}, logged_in),
    "api/docs": method(GET, logged_in),
    "api/<path:rest>": same(nobody),
    "accounts/login/": same(everyone),
    "accounts/logout/": method(POST, lambda role: {"ok", "login"}),
}

# What a superuser is refused in the admin too: the append-only ledger and audit log, and
# rows only services create. (app_model, action)
ADMIN_REFUSED = {
    ("jobs_job", "add"),
    ("jobs_attempt", "add"),
    ("jobs_attempt", "delete"),
    ("jobs_jobevent", "add"),
    ("jobs_jobevent", "delete"),
    ("batches_batch", "add"),
    ("review_reviewitem", "add"),
    ("jobs_webhookdelivery", "add"),
}
ADMIN_VIEWS = {"changelist": "view", "change": "view", "history": "view", "add": "add"}


def admin_rule(route: str, name: str | None) -> Rule:
    """The admin: staff only (others are sent to its login page); an operator sees the pages
    of the models the README gives the Operators group, and is refused the others."""
    if route.startswith(("admin/django-rq/", "admin/django_rq/dashboard/")):
        return rq_api if "stats.json" in route or "metrics" in route else staff
    if route in ("admin/login/",):
        return everyone
    if route == "admin/logout/":
        return lambda role: {"ok", "405", "login", "admin-login"}
    if route == "admin/autocomplete/":  # refuses a request without its parameters
        return lambda role: {"403"} if role in STAFF else admin_login(role)
    if name == "jobs_provider_reset_breaker":  # a POST button
        return lambda role: {"405"} if role in STAFF else admin_login(role)
    if route == "admin/(?P<url>.*)$":  # the admin's catch-all
        return lambda role: {"404"} if role in STAFF else admin_login(role)
    operator_perms = documented_roles()["Operators"]
    match = re.fullmatch(r"(\w+?_\w+?)_(changelist|add|history|delete|change)", name or "")
    if match is None and (m := re.fullmatch(r"admin/(\w+)/(\w+)/<path:object_id>/", route)):
        match_model, action = f"{m.group(1)}_{m.group(2)}", "view"
    elif match is not None:
        match_model, action = match.group(1), ADMIN_VIEWS.get(match.group(2), match.group(2))
    else:
        match_model = action = None

    def rule(role: str) -> set[str]:
        if role not in STAFF:
            return admin_login(role)
        if match_model is None:  # index, app lists, password change, view on site, jsi18n
            return {"ok", "404"}
        if name is None:  # <id>/ redirects to its change page, which decides
            return {"ok"}
        if (match_model, action) in ADMIN_REFUSED:
            return {"403"}
        if role == "admin":
            return {"ok"}
        app, model = match_model.split("_", 1)
        wanted = {f"{app}.{action}_{model}"}
        if action == "view":
            wanted.add(f"{app}.change_{model}")
        return {"ok"} if wanted & operator_perms else {"403"}

    return rule


# --- the URLs ---------------------------------------------------------------------------------


def patterns(resolvers=None, prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for entry in resolvers if resolvers is not None else get_resolver().url_patterns:
        if isinstance(entry, URLResolver):
            yield from patterns(entry.url_patterns, prefix + str(entry.pattern))
        else:
            yield prefix + str(entry.pattern), entry


# Regex patterns have no converters to fill: their example paths.
REGEX_EXAMPLES = {
    r"admin/django-rq/^stats.json/?$": "admin/django-rq/stats.json/",
    r"admin/django-rq/^stats.json/(?P<token>[\w]+)?/?$": "admin/django-rq/stats.json/tok/",
    r"admin/django-rq/^metrics/?$": "admin/django-rq/metrics/",
    r"admin/^(?P<app_label>auth|jobs|django_rq|review|batches)/$": "admin/jobs/",
    r"admin/(?P<url>.*)$": "admin/no-such-page/",
    r"admin/django_rq/dashboard/^stats.json/?$": "admin/django_rq/dashboard/stats.json/",
    r"admin/django_rq/dashboard/^stats.json/(?P<token>[\w]+)?/?$": (
        "admin/django_rq/dashboard/stats.json/tok/"
    ),
    r"admin/django_rq/dashboard/^metrics/?$": "admin/django_rq/dashboard/metrics/",
}


def rule_for(route: str, name: str | None, http_method: str) -> Rule | None:
    if route in RULES:
        return RULES[route](http_method)
    if route.startswith("admin/"):
        return admin_rule(route, name)
    return None


def test_every_url_pattern_has_a_rule():
    missing = [route for route, p in patterns() if rule_for(route, p.name, "GET") is None]
    assert missing == [], f"add a rule to tests/test_authorization_matrix.py for {missing}"
    regexes = [r for r, _ in patterns() if "^" in r or "(?P" in r]
    assert sorted(set(regexes) - set(REGEX_EXAMPLES)) == []


# --- the world the requests see ---------------------------------------------------------------


@pytest.fixture
def world(db, redis_conn, settings):
    settings.AIQUEUE_SIMULATOR_URL = "http://127.0.0.1:9"  # refuses: faults fail politely
    users = {
        "no_group": User.objects.create_user("nog", password="pw-nog-123"),
        "submitter": User.objects.create_user("sub", password="pw-sub-123"),
        "reviewer": User.objects.create_user("rev", password="pw-rev-123"),
        "operator": User.objects.create_user("ope", password="pw-ope-123", is_staff=True),
        "admin": User.objects.create_superuser("adm", password="pw-adm-123"),
    }
    users["reviewer"].groups.add(Group.objects.get(name="Reviewers"))
    users["operator"].groups.add(Group.objects.get(name="Operators"))
    provider = Provider.objects.create(name="Sim", kind=Provider.Kind.SIMULATED)
    ModelPrice.objects.create(provider=provider, model="m", input_per_mtok=Decimal(1))
    workload = Workload.objects.create(
        name="W", kind=Workload.Kind.SUMMARIZE, provider=provider, model="m"
    )
    submitter = users["submitter"]
    job, _ = services.do_submit_job(workload=workload, input_text="hello", user=submitter)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.NEEDS_REVIEW)
    item = ReviewItem.objects.create(job=job, reason=ReviewItem.Reason.FAILED)
    Attempt.objects.create(
        job=job, number=1, provider=provider, model="m", started_at=job.created_at
    )
    batch = batch_services.do_create_batch(
        workload=workload, filename="b.csv", data=b"input\nhi\n", user=submitter
    )
    Budget.objects.create(name="B", cap_usd=Decimal(10))
    token = ApiToken(user=submitter, name="t")
    token.set_new_key()
    token.save()
    hook = Webhook.objects.create(name="h", url="http://127.0.0.1:9/", secret="s")
    delivery = WebhookDelivery.objects.create(webhook=hook, job=job, event="job.failed", body="{}")
    objects = {
        "jobs_webhook": hook.pk,
        "jobs_webhookdelivery": delivery.pk,
        "jobs_provider": provider.pk,
        "jobs_workload": workload.pk,
        "jobs_job": job.pk,
        "jobs_attempt": Attempt.objects.get().pk,
        "jobs_jobevent": JobEvent.objects.first().pk,
        "jobs_apitoken": token.pk,
        "jobs_budget": Budget.objects.get().pk,
        "review_reviewitem": item.pk,
        "batches_batch": batch.pk,
        "auth_user": submitter.pk,
        "auth_group": Group.objects.get(name="Operators").pk,
    }
    return {"users": users, "job": job, "batch": batch, "item": item, "objects": objects,
            "workload": workload, "provider": provider}  # fmt: skip


def example_path(route: str, name: str | None, world: dict) -> str:
    if route in REGEX_EXAMPLES:
        return "/" + REGEX_EXAMPLES[route]
    model = re.match(r"admin/(\w+)/(\w+)/", route)
    object_id = world["objects"].get(f"{model.group(1)}_{model.group(2)}") if model else None

    def value(match: re.Match) -> str:
        converter, arg = match.group(1), match.group(2)
        if converter == "uuid":
            if route.startswith(("batches/", "api/batches/")):
                return str(world["batch"].code)
            return str(world["job"].code)
        if arg == "pk":
            if route.startswith("review/"):
                return str(world["item"].pk)
            if "providers" in route:
                return str(world["provider"].pk)
            return str(world["workload"].pk)
        if arg in ("object_id", "id"):
            return str(object_id or 1)
        if arg == "content_type_id":
            return "1"
        if converter == "int":
            return "0"
        return "x"

    return "/" + re.sub(r"<(?:(\w+):)?(\w+)>", value, route)


def outcome(response) -> str:
    """What a cell shows: a 400 to a POST without data is "ok" (the view let the role in, then
    refused the empty form)."""
    status = response.status_code
    if status in (301, 302):
        location = response["Location"]
        if location.startswith("/admin/login/"):
            return "admin-login"
        if location.startswith("/accounts/login/"):
            return "login"
        return "ok"
    if status in (401, 403, 404, 405, 500):
        return str(status)
    return "ok"


def client_for(role: str, world: dict) -> Client:
    client = Client(raise_request_exception=False)
    if role != "anonymous":
        client.force_login(world["users"][role])
    return client


def cells() -> list[tuple[str, str | None, str]]:
    found = []
    for route, p in patterns():
        found.append((route, p.name, "GET"))
        if not route.startswith("admin/"):
            found.append((route, p.name, "POST"))
    return found


@pytest.mark.parametrize("role", ROLES)
def test_every_url_answers_each_role_as_its_rule_says(world, role):
    client = client_for(role, world)
    wrong = []
    for route, name, http_method in cells():
        path = example_path(route, name, world)
        expected = rule_for(route, name, http_method)(role)
        with transaction.atomic():
            response = getattr(client, http_method.lower())(path)
            transaction.set_rollback(True)
        got = outcome(response)
        if response.status_code == 400 and http_method == "GET":
            got = "400"  # a page refusing a plain GET is not "let in"
        if got not in expected:
            wrong.append(f"{http_method} {path} ({route}): {got} ({response.status_code}), "
                         f"expected {sorted(expected)}")  # fmt: skip
        if route == "accounts/logout/" and http_method == "POST":
            client = client_for(role, world)  # logged out: log in again
    assert wrong == [], "\n".join(wrong)


def test_the_matrix_covers_every_pattern():
    # 179 patterns when this was written; the admin's are asked with GET only.
    assert len({route for route, _, _ in cells()}) >= 170
