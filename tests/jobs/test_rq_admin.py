"""django-rq's admin pages answer 404 for what does not exist, never 500 (issue 18, defect 8)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

MISSING = [
    "/admin/django-rq/queues/99/",
    "/admin/django-rq/queues/0/nope/",
    "/admin/django-rq/queues/0/nope/delete/",
    "/admin/django-rq/queues/0/nope/requeue/",
    "/admin/django-rq/queues/0/nope/enqueue/",
    "/admin/django-rq/workers/0/nope/",
    "/admin/django-rq/schedulers/0/",
    "/admin/django-rq/schedulers/9/",
    "/admin/django_rq/dashboard/1/change/",
    "/admin/django_rq/dashboard/1/delete/",
    "/admin/django_rq/dashboard/1/history/",
    "/admin/django_rq/dashboard/workers/0/nope/",
    "/admin/django_rq/dashboard/queues/99/",
]


@pytest.fixture
def staff_client(client, db, redis_conn):
    client.force_login(User.objects.create_superuser("root", "r@example.com", "pw-root-123"))
    client.raise_request_exception = False
    return client


@pytest.mark.parametrize("path", MISSING)
@pytest.mark.parametrize("method", ["get", "post"])
def test_a_django_rq_address_naming_nothing_is_404_for_staff(staff_client, path, method):
    assert getattr(staff_client, method)(path).status_code == 404


@pytest.mark.parametrize("path", ["/admin/django-rq/", "/admin/django_rq/dashboard/"])
def test_the_dashboards_still_answer(staff_client, path):
    assert staff_client.get(path).status_code == 200


def test_anonymous_visitors_are_sent_to_log_in_not_told_what_exists(client, db):
    response = client.get("/admin/django-rq/queues/0/nope/delete/")
    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_view_on_site_of_the_tableless_dashboard_model_is_404(staff_client):
    from django.contrib.contenttypes.models import ContentType
    from django_rq.models import Dashboard

    content_type = ContentType.objects.get_for_model(Dashboard)
    assert staff_client.get(f"/admin/r/{content_type.pk}/1/").status_code == 404
