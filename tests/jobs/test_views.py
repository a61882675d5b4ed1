from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs import live, services
from jobs.models import Job, Workload
from tests.factories import submit
from tests.helpers import unnamed_filter_fields


# A fixed code (no job has it): xdist workers must collect the same test ids.
@pytest.mark.parametrize("url", ["/", "/jobs/", "/jobs/new/", f"/jobs/{uuid.UUID(int=1)}/"])
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


def test_new_job_form_shows_the_estimate_and_what_it_is_based_on(user_client, workload):
    from jobs.flow import budgets

    page = user_client.get(reverse("jobs:new")).content.decode()
    assert 'id="job-estimate"' in page
    assert "Costs at most $" in page
    assert "UTF-8 byte" in page  # what it is based on, said before anything is typed

    def estimate_of(text: str) -> str:
        response = user_client.post(
            reverse("jobs:new"),
            {"workload": workload.pk, "input_text": text, "estimate": "1"},
            headers={"HX-Request": "true"},
        )
        assert response.status_code == 200
        body = response.content.decode()
        assert body.lstrip().startswith('<div id="job-estimate"')  # only the region
        return body

    english, chinese = "The meeting covered hiring.", "会议讨论了招聘计划和差旅预算。"
    for text in (english, chinese):
        expected = budgets.estimate_job(workload, text)
        body = estimate_of(text)
        assert f'data-estimate-usd="{expected.usd}"' in body
        assert f"up to {expected.tokens_in} input and {workload.max_output_tokens} output" in body
    # Fewer characters, more bytes: the Chinese input is reserved for more tokens.
    assert (
        budgets.estimate_job(workload, chinese).tokens_in
        > budgets.estimate_job(workload, english).tokens_in
    )
    assert not Job.objects.exists()  # an estimate submits nothing


def test_new_job_estimate_without_a_price_says_so(user_client, workload):
    workload.model = "sim-unpriced"
    workload.save()
    response = user_client.post(
        reverse("jobs:new"), {"workload": workload.pk, "input_text": "x", "estimate": "1"}
    )
    assert "cannot estimate cost" in response.content.decode()  # the no-JS page, whole


def test_double_submitted_form_creates_one_job(user_client, workload):
    data = {"workload": workload.pk, "input_text": "x", "idempotency_key": "form-1"}
    first = user_client.post(reverse("jobs:new"), data)
    second = user_client.post(reverse("jobs:new"), data)
    assert Job.objects.count() == 1
    assert first["Location"] == second["Location"]


def test_new_job_form_shows_errors_and_keeps_input(user_client, workload):
    response = user_client.post(reverse("jobs:new"), {"workload": workload.pk, "input_text": "   "})
    assert response.status_code == 400  # a rejected form (issue 18)
    assert "Enter the input for the model." in response.content.decode()
    assert Job.objects.count() == 0


def test_detail_shows_status_output_and_events(user_client, workload, user):
    job = submit(workload, user, "<script>alert(1)</script>")
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
    job = submit(workload, other_user, "notes")
    client.force_login(user)
    assert client.get(job.get_absolute_url()).status_code == 404


def test_operator_sees_every_job(client, workload, user, operator):
    job = submit(workload, user, "notes")
    client.force_login(operator)
    assert client.get(job.get_absolute_url()).status_code == 200
    assert str(job.code)[:8] in client.get(reverse("jobs:list")).content.decode()


def test_list_filters_by_status_and_workload(user_client, workload, user):
    queued = submit(workload, user, "a")
    done = submit(workload, user, "b")
    Job.objects.filter(pk=done.pk).update(status="succeeded")
    body = user_client.get(reverse("jobs:list"), {"status": "succeeded"}).content.decode()
    assert str(done.code)[:8] in body
    assert str(queued.code)[:8] not in body


def test_list_is_paginated_newest_first(user_client, workload, user, settings):
    settings.AIQUEUE_JOBS_PER_PAGE = 2
    jobs = [submit(workload, user, str(i)) for i in range(3)]
    first_page = user_client.get(reverse("jobs:list"))
    assert [j.pk for j in first_page.context["page"].object_list] == [jobs[2].pk, jobs[1].pk]
    second_page = user_client.get(reverse("jobs:list"), {"page": 2})
    assert [j.pk for j in second_page.context["page"].object_list] == [jobs[0].pk]


def test_list_htmx_request_renders_only_the_table(user_client, workload, user):
    submit(workload, user, "notes")
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
    invoice = submit(workload, user, "Invoice 1042 from ACME is overdue")
    notes = submit(workload, user, "Standup notes: deploy on Friday")
    submit(workload, other_user, "Invoice from a customer of someone else")

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


def test_list_says_which_filter_value_is_bad_and_applies_the_others(user_client, workload, user):
    other = Workload.objects.create(name="Other", provider=workload.provider, model="sim-small")
    mine = submit(workload, user, "a")
    elsewhere = submit(other, user, "b")

    response = user_client.get(reverse("jobs:list"), {"status": "bogus", "workload": other.pk})
    body = response.content.decode()
    assert "Status: Select a valid choice. bogus is not one of the available choices." in body
    assert "This filter is ignored." in body
    assert [job.pk for job in response.context["page"]] == [elsewhere.pk]  # workload applies

    htmx = {"HX-Request": "true"}
    response = user_client.get(reverse("jobs:list"), {"workload": "999"}, headers=htmx)
    body = response.content.decode()
    assert "Workload: Select a valid choice." in body  # in the table region htmx swaps
    assert {job.pk for job in response.context["page"]} == {mine.pk, elsewhere.pk}

    body = user_client.get(reverse("jobs:list"), {"status": "queued"}).content.decode()
    assert "Select a valid choice" not in body


def test_list_shows_a_documents_cost_with_its_chunks_in_one_query(
    user_client, workload, user, provider
):
    digest = Workload.objects.create(
        name="Digest", kind=Workload.Kind.DOCUMENT, provider=provider, model="sim-small"
    )

    def document(reduce_cost: str, *chunk_costs: str) -> Job:
        job = Job.objects.create(
            workload=digest,
            submitted_by=user,
            input_text="doc",
            status="succeeded",
            cost_actual=Decimal(reduce_cost),
        )
        for index, cost in enumerate(chunk_costs):
            Job.objects.create(
                workload=digest,
                submitted_by=user,
                input_text=f"part {index}",
                status="succeeded",
                parent=job,
                chunk_index=index,
                cost_actual=Decimal(cost),
            )
        return job

    job = document("0", "0.00005", "0.000066")
    plain = submit(workload, user, "notes")
    Job.objects.filter(pk=plain.pk).update(cost_actual=Decimal("0.000012"))
    assert job.total_cost == Decimal("0.000116")

    with CaptureQueriesContext(connection) as one_document:
        body = user_client.get(reverse("jobs:list")).content.decode()
    row = body[body.index(f'id="job-row-{job.code}"') :]
    assert '<td class="num">0.000116</td>' in row[: row.index("</tr>")]
    assert '<td class="num">0.000012</td>' in body
    # A live update of the row (rendered without the list's query) says the same.
    assert '<td class="num">0.000116</td>' in live.render_row(job, Job.objects.all())

    document("0.00001", "0.00002")
    document("0", "0.00003", "0.00004")
    with CaptureQueriesContext(connection) as three_documents:
        user_client.get(reverse("jobs:list"))
    assert len(three_documents) == len(one_document)  # no query per row


def test_list_filters_have_accessible_names(user_client, workload, user):
    submit(workload, user, "notes")
    body = user_client.get(reverse("jobs:list")).content.decode()
    assert unnamed_filter_fields(body) == []


def test_cancel_from_job_page(user_client, workload, user):
    job = submit(workload, user, "notes")
    response = user_client.post(reverse("jobs:cancel", args=[job.code]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert job.events.last().actor == user


def test_cancel_requires_post(user_client, workload, user):
    job = submit(workload, user, "notes")
    assert user_client.get(reverse("jobs:cancel", args=[job.code])).status_code == 405
    job.refresh_from_db()
    assert job.status == "queued"


def test_cancel_of_someone_elses_job_is_refused(client, workload, user, other_user):
    job = submit(workload, other_user, "notes")
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


def paused_beside_a_document_workload(workload) -> Workload:
    """`workload` paused, and a document workload that sorts first in the select."""
    workload.is_paused = True
    workload.description = "Summarises meeting notes."
    workload.save()
    return Workload.objects.create(
        name="Contract digest",
        kind=Workload.Kind.DOCUMENT,
        provider=workload.provider,
        model=workload.model,
    )


def test_new_job_form_for_a_paused_workload_shows_it_and_says_it_takes_no_jobs(
    user_client, workload
):
    other = paused_beside_a_document_workload(workload)
    page = user_client.get(f"{reverse('jobs:new')}?workload={workload.pk}").content.decode()
    # The select, the description and the fields all describe the paused workload.
    assert f'<option value="{workload.pk}" selected>Summaries (paused)</option>' in page
    assert f'<option value="{other.pk}">Contract digest</option>' in page
    assert "Summarises meeting notes." in page
    assert 'name="input_text"' in page
    assert 'name="document"' not in page
    assert "Summaries is paused by an operator: it takes no new jobs until it is resumed." in page


def test_new_job_form_without_a_choice_starts_on_a_workload_that_takes_jobs(user_client, workload):
    other = paused_beside_a_document_workload(workload)
    workload.name = "A meeting summary"  # sorts before "Contract digest", but is paused
    workload.save()
    page = user_client.get(reverse("jobs:new")).content.decode()
    assert f'<option value="{other.pk}" selected>Contract digest</option>' in page
    assert 'name="document"' in page
    assert "is paused" not in page


def test_submitting_to_a_paused_workload_is_refused_and_keeps_what_was_typed(user_client, workload):
    paused_beside_a_document_workload(workload)
    response = user_client.post(
        reverse("jobs:new"),
        {"workload": workload.pk, "input_text": "Notes I typed", "idempotency_key": "k1"},
    )
    page = response.content.decode()
    assert response.status_code == 400
    assert "Summaries is paused by an operator" in page
    assert f'<option value="{workload.pk}" selected>' in page
    assert "Notes I typed</textarea>" in page
    assert "This field is required." not in page
    assert not Job.objects.exists()


def stage_on_page(client, job: Job) -> str:
    page = client.get(job.get_absolute_url()).content.decode()
    return page.split('id="job-stage">', 1)[1].split("</dd>", 1)[0]


def test_a_job_scheduled_for_another_day_says_which_day(user_client, workload, user):
    from datetime import timedelta

    from django.utils import timezone

    start_at = timezone.now() + timedelta(days=400)
    job = services.do_submit_job(workload=workload, input_text="x", user=user, start_at=start_at)[0]
    stage = stage_on_page(user_client, job)
    assert stage.startswith('<span class="stage stage-scheduled">Scheduled</span>')
    assert f">{timezone.localtime(start_at):%Y-%m-%d %H:%M}</time>" in stage


def test_a_job_resuming_today_shows_only_the_time(user_client, workload, user):
    from django.utils import timezone

    job = submit(workload, user, "notes")
    resume_at = timezone.now()
    services.do_park_job(
        job,
        reason="concurrency cap full (1/1) for Summaries",
        resume_at=resume_at,
        kind=Job.WaitKind.CAPACITY,
    )
    stage = stage_on_page(user_client, job)
    assert stage.startswith('<span class="stage stage-waiting">Waiting for capacity</span>')
    assert f">{timezone.localtime(resume_at):%H:%M:%S}</time>" in stage


def test_new_job_form_ignores_a_workload_id_that_is_not_one(user_client, workload):
    response = user_client.get(f"{reverse('jobs:new')}?workload=5%27")
    assert response.status_code == 200
    assert f'<option value="{workload.pk}" selected>Summaries</option>' in response.content.decode()


def test_a_job_held_for_budget_at_submit_says_so_not_runs_in_the_background(
    user_client, workload, redis_conn
):
    from jobs.models import Budget

    Budget.objects.create(name="Frozen", cap_usd=Decimal("0"))  # holds, never rejects
    response = user_client.post(
        reverse("jobs:new"),
        {"workload": workload.pk, "input_text": "Notes", "idempotency_key": "held-1"},
        follow=True,
    )
    page = response.content.decode()
    job = Job.objects.get()
    assert job.status == "held"
    assert "runs only once the cap is raised" in job.wait_reason
    assert f"Job submitted but held: {job.wait_reason}.".replace("'", "&#x27;") in page
    assert "It runs in the background" not in page
