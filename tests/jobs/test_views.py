from __future__ import annotations

import uuid

import pytest
from django.urls import reverse

from jobs import services
from jobs.models import Job


def make_job(workload, user, text="notes") -> Job:
    return services.do_submit_job(workload=workload, input_text=text, user=user)[0]


@pytest.mark.parametrize("url", ["/", "/jobs/", "/jobs/new/", f"/jobs/{uuid.uuid4()}/"])
def test_every_page_requires_login(client, db, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_new_job_form_submits_and_redirects_to_the_job(user_client, workload):
    form = user_client.get(reverse("jobs:new"))
    key = form.context["form"].initial["idempotency_key"]
    response = user_client.post(
        reverse("jobs:new"),
        {
            "workload": workload.pk,
            "input_text": "Long notes",
            "priority": "",
            "idempotency_key": key,
        },
    )
    job = Job.objects.get()
    assert response.status_code == 302
    assert response["Location"] == job.get_absolute_url()
    assert job.status == "queued"
    assert job.input_text == "Long notes"


def test_double_submitted_form_creates_one_job(user_client, workload):
    data = {"workload": workload.pk, "input_text": "x", "idempotency_key": "form-1"}
    first = user_client.post(reverse("jobs:new"), data)
    second = user_client.post(reverse("jobs:new"), data)
    assert Job.objects.count() == 1
    assert first["Location"] == second["Location"]


def test_new_job_form_shows_errors_and_keeps_input(user_client, workload):
    response = user_client.post(reverse("jobs:new"), {"workload": workload.pk, "input_text": "   "})
    assert response.status_code == 200
    assert "Enter the input for the model." in response.content.decode()
    assert Job.objects.count() == 0


def test_detail_shows_status_output_and_events(user_client, workload, user):
    job = make_job(workload, user, "<script>alert(1)</script>")
    Job.objects.filter(pk=job.pk).update(
        status="succeeded", output_text="<img src=x onerror=alert(1)>"
    )
    body = user_client.get(job.get_absolute_url()).content.decode()
    assert "Succeeded" in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "submitted" in body


def test_detail_of_someone_elses_job_is_404(client, workload, user, other_user):
    job = make_job(workload, other_user)
    client.force_login(user)
    assert client.get(job.get_absolute_url()).status_code == 404


def test_operator_sees_every_job(client, workload, user, operator):
    job = make_job(workload, user)
    client.force_login(operator)
    assert client.get(job.get_absolute_url()).status_code == 200
    assert str(job.code)[:8] in client.get(reverse("jobs:list")).content.decode()


def test_list_filters_by_status_and_workload(user_client, workload, user):
    queued = make_job(workload, user, "a")
    done = make_job(workload, user, "b")
    Job.objects.filter(pk=done.pk).update(status="succeeded")
    body = user_client.get(reverse("jobs:list"), {"status": "succeeded"}).content.decode()
    assert str(done.code)[:8] in body
    assert str(queued.code)[:8] not in body


def test_list_is_paginated_newest_first(user_client, workload, user, settings):
    settings.AIQUEUE_JOBS_PER_PAGE = 2
    jobs = [make_job(workload, user, str(i)) for i in range(3)]
    first_page = user_client.get(reverse("jobs:list"))
    assert [j.pk for j in first_page.context["page"].object_list] == [jobs[2].pk, jobs[1].pk]
    second_page = user_client.get(reverse("jobs:list"), {"page": 2})
    assert [j.pk for j in second_page.context["page"].object_list] == [jobs[0].pk]


def test_list_htmx_request_renders_only_the_table(user_client, workload, user):
    make_job(workload, user)
    response = user_client.get(reverse("jobs:list"), headers={"HX-Request": "true"})
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="job-table"')
    assert "<html" not in body


def test_empty_list_says_so(user_client, db):
    body = user_client.get(reverse("jobs:list")).content.decode()
    assert "No jobs yet" in body
    assert "No jobs match" not in body
    filtered = user_client.get(reverse("jobs:list"), {"status": "failed"}).content.decode()
    assert "No jobs match these filters" in filtered


def listed(client, **params) -> list[int]:
    return [job.pk for job in client.get(reverse("jobs:list"), params).context["page"]]


def test_list_search_finds_input_text_and_codes(user_client, workload, user, other_user):
    invoice = make_job(workload, user, "Invoice 1042 from ACME is overdue")
    notes = make_job(workload, user, "Standup notes: deploy on Friday")
    make_job(workload, other_user, "Invoice from a customer of someone else")

    assert listed(user_client, q="acme") == [invoice.pk]  # any case, anywhere in the input
    assert listed(user_client, q="invoice") == [invoice.pk]  # never another user's job
    code = str(notes.code)
    assert listed(user_client, q=code[:8]) == [notes.pk]  # as the list shows it
    assert listed(user_client, q=code.upper()) == [notes.pk]  # pasted whole
    assert listed(user_client, q=code) == [notes.pk]
    assert listed(user_client, q="nothing like this") == []
    body = user_client.get(reverse("jobs:list"), {"q": "nothing like this"}).content.decode()
    assert "No jobs match these filters" in body
    # Search and filters combine.
    Job.objects.filter(pk=notes.pk).update(status="succeeded")
    assert listed(user_client, q=code[:8], status="queued") == []


def test_cancel_from_job_page(user_client, workload, user):
    job = make_job(workload, user)
    response = user_client.post(reverse("jobs:cancel", args=[job.code]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert job.events.last().actor == user


def test_cancel_requires_post(user_client, workload, user):
    job = make_job(workload, user)
    assert user_client.get(reverse("jobs:cancel", args=[job.code])).status_code == 405
    job.refresh_from_db()
    assert job.status == "queued"


def test_cancel_of_someone_elses_job_is_refused(client, workload, user, other_user):
    job = make_job(workload, other_user)
    client.force_login(user)
    assert client.post(reverse("jobs:cancel", args=[job.code])).status_code == 404
    job.refresh_from_db()
    assert job.status == "queued"


def test_forms_require_csrf(client, workload, user):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    response = strict.post(reverse("jobs:new"), {"workload": workload.pk, "input_text": "x"})
    assert response.status_code == 403
    assert Job.objects.count() == 0


def test_pages_send_a_strict_content_security_policy(user_client, db):
    csp = user_client.get("/").headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp


def test_the_admin_is_named_for_aiqueue(admin_client):
    html = admin_client.get("/admin/").content.decode()
    assert "aiqueue administration" in html
    assert "Workloads, providers, budgets and users" in html
