"""Error pages: in the site's layout, saying what happened and that nothing was changed."""

from __future__ import annotations

import uuid

from django.test import Client, RequestFactory
from django.views.defaults import bad_request, server_error

from jobs import services
from jobs.models import Job


def test_unknown_job_is_a_404_page_with_the_site_navigation(user_client):
    response = user_client.get(f"/jobs/{uuid.uuid4()}/")
    assert response.status_code == 404
    html = response.content.decode()
    assert "<h1>Not found</h1>" in html
    assert 'class="topbar"' in html  # the viewer keeps the site's navigation
    assert 'href="/jobs/"' in html


def test_someone_elses_job_is_not_found_rather_than_shown(client, user, other_user, workload):
    job = services.do_submit_job(workload=workload, input_text="private", user=other_user)[0]
    client.force_login(user)
    response = client.get(job.get_absolute_url())
    assert response.status_code == 404
    assert "<h1>Not found</h1>" in response.content.decode()
    assert "private" not in response.content.decode()


def test_a_role_the_user_lacks_gets_a_403_page_with_the_reason(user_client):
    response = user_client.get("/review/")
    assert response.status_code == 403
    html = response.content.decode()
    assert "<h1>Not allowed</h1>" in html
    assert "The review inbox is for reviewers." in html
    assert 'class="topbar"' in html


def test_a_form_without_a_valid_csrf_token_is_refused_and_saves_nothing(user, workload):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(
        "/jobs/new/", {"workload": workload.pk, "input_text": "hello", "priority": ""}
    )
    assert response.status_code == 403
    html = response.content.decode()
    assert "This form could not be accepted" in html
    assert "Nothing was saved." in html
    assert not Job.objects.exists()


def test_server_and_bad_request_errors_render_without_a_request_context(db):
    # Django renders these two with no context at all: the templates must not need one.
    request = RequestFactory().get("/")
    response = server_error(request)
    assert response.status_code == 500
    assert "<h1>Something went wrong</h1>" in response.content.decode()
    response = bad_request(request, exception=ValueError("bad"))
    assert response.status_code == 400
    assert "<h1>Bad request</h1>" in response.content.decode()
