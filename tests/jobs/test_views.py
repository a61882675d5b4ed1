from __future__ import annotations

import uuid
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs import live, services
from jobs.models import Job, Workload


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


def test_list_says_which_filter_value_is_bad_and_applies_the_others(user_client, workload, user):
    other = Workload.objects.create(name="Other", provider=workload.provider, model="sim-small")
    mine = make_job(workload, user, "a")
    elsewhere = make_job(other, user, "b")

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
    plain = make_job(workload, user)
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


class LabelledFields(HTMLParser):
    """The select and input fields inside the form with class `filters`, each with whether it
    has an accessible name (aria-label, or a <label for=its id>)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_filters = False
        self.fields: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.in_filters = "filters" in (attributes.get("class") or "").split()
        elif tag == "label" and attributes.get("for"):
            self.label_for.add(attributes["for"])
        elif self.in_filters and tag in ("select", "input", "textarea"):
            if attributes.get("type") != "hidden":
                self.fields.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.in_filters = False

    def unnamed(self) -> list[str]:
        return [
            str(field.get("name"))
            for field in self.fields
            if not field.get("aria-label") and field.get("id") not in self.label_for
        ]


def unnamed_filter_fields(html: str) -> list[str]:
    parser = LabelledFields()
    parser.feed(html)
    assert parser.fields, "no filter fields found"
    return parser.unnamed()


def test_list_filters_have_accessible_names(user_client, workload, user):
    make_job(workload, user)
    body = user_client.get(reverse("jobs:list")).content.decode()
    assert unnamed_filter_fields(body) == []


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
    assert response.status_code == 200
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

    job = make_job(workload, user)
    resume_at = timezone.now()
    services.do_park_job(
        job, reason="concurrency cap full (1/1) for Summaries", resume_at=resume_at
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
