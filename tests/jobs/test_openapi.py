"""The API's document (jobs.openapi): valid OpenAPI 3.1, the same routes and methods as the
URLconf, and a schemathesis run against a live server that finds no 500 and no answer the
document does not describe."""

from __future__ import annotations

import re

import pytest
import schemathesis
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from jobs import openapi
from jobs.models import ApiToken


def test_the_document_is_valid_openapi_3_1():
    validate(openapi.spec())


def api_routes() -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern) and route.startswith("api/"):
                if "<path:rest>" in route:
                    continue  # the JSON 404 for every other address
                methods = getattr(pattern.callback, "allowed_methods", None)
                assert methods, f"/{route} does not say its methods (jobs.api.allow)"
                path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
                routes.update((path, m.lower()) for m in methods if m != "HEAD")

    walk(get_resolver().url_patterns, "")
    return routes


def test_every_api_route_and_method_is_in_the_document_and_nothing_else():
    documented = {
        (path, method)
        for path, item in openapi.spec()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert api_routes() == documented


def test_the_document_is_served_to_a_token_and_the_page_to_a_session(client, user):
    api_token = ApiToken(user=user, name="docs")
    key = api_token.set_new_key()
    api_token.save()
    served = client.get("/api/openapi.json", headers={"Authorization": f"Bearer {key}"})
    assert served.json() == openapi.spec()
    assert client.get("/api/openapi.json").status_code == 401
    assert client.get("/api/docs").status_code == 302  # to the login page
    client.force_login(user)
    page = client.get("/api/docs").content.decode()
    assert "POST /api/jobs/{code}/replay" in page
    assert "<script" not in page.split("</head>")[1]  # the page itself runs nothing


# The docs page is for a logged-in browser (a redirect to the login page otherwise), not a
# program. A request that fits the document may still be refused for what it names (a
# workload that does not exist): positive_data_acceptance cannot know, so it is left out.
schema = schemathesis.openapi.from_dict(openapi.spec()).exclude(path="/api/docs")


@pytest.fixture
def live_auth(transactional_db, user, workload, settings) -> dict:
    """A token for the live server's requests, and the workload the document's example names."""
    settings.AIQUEUE_SUBMIT_CONCURRENCY = 0
    api_token = ApiToken(user=user, name="schemathesis")
    key = api_token.set_new_key()
    api_token.save()
    return {"Authorization": f"Bearer {key}"}


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_live_api_answers_as_its_document_says(case, live_server, live_auth):
    case.call_and_validate(
        base_url=live_server.url,
        headers=live_auth,
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )
