"""The job list's richer filters, sorts and columns (jobs.forms.JobFilterForm, jobs.views)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest
from django.template import Context, Template
from django.urls import reverse
from django.utils import timezone

from batches.models import Batch
from jobs import services
from jobs.models import Job

pytestmark = pytest.mark.django_db


def make(workload, user, **fields) -> Job:
    job = services.do_submit_job(workload=workload, input_text="notes", user=user)[0]
    if fields:
        Job.objects.filter(pk=job.pk).update(**fields)
        job.refresh_from_db()
    return job


def listed(client, **params) -> list[int]:
    response = client.get(reverse("jobs:list"), params)
    assert response.status_code == 200
    return [job.pk for job in response.context["page"].object_list]


def test_each_filter_narrows_the_list(client, workload, user, other_user, operator):
    now = timezone.now()
    batch = Batch.objects.create(workload=workload, created_by=user, filename="rows.csv")
    high = make(workload, user, priority="high")
    broken = make(workload, user, error_class="server_error", status="failed")
    bobs = make(workload, other_user)
    in_batch = make(workload, user, batch=batch)
    tried = make(workload, user, attempt_count=4)
    costly = make(workload, user, cost_actual=Decimal("0.5"))
    slow = make(workload, user, started_at=now - timedelta(seconds=90), finished_at=now)
    old = make(workload, user, created_at=now - timedelta(days=3))
    client.force_login(operator)

    assert listed(client, priority="high") == [high.pk]
    assert listed(client, error_class="SERVER_ERROR") == [broken.pk]
    assert listed(client, submitter="bob") == [bobs.pk]
    assert listed(client, batch=str(batch.code)) == [in_batch.pk]
    assert listed(client, min_attempts=3) == [tried.pk]
    assert listed(client, min_cost="0.1") == [costly.pk]
    assert listed(client, min_duration=60) == [slow.pk]
    before = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    assert listed(client, until=before) == [old.pk]
    assert old.pk not in listed(client, since=before)


def test_sorts_by_each_column_both_ways(client, workload, user):
    now = timezone.now()
    cheap = make(workload, user, cost_actual=Decimal("0.1"), attempt_count=3, priority="low")
    dear = make(workload, user, cost_actual=Decimal("0.9"), attempt_count=1, priority="high")
    unrun = make(workload, user, priority="default")
    Job.objects.filter(pk=cheap.pk).update(started_at=now - timedelta(seconds=5), finished_at=now)
    Job.objects.filter(pk=dear.pk).update(started_at=now - timedelta(seconds=50), finished_at=now)
    client.force_login(user)

    assert listed(client, sort="-cost") == [dear.pk, cheap.pk, unrun.pk]
    assert listed(client, sort="cost") == [unrun.pk, cheap.pk, dear.pk]
    assert listed(client, sort="-attempts")[:2] == [cheap.pk, dear.pk]
    assert listed(client, sort="priority") == [dear.pk, unrun.pk, cheap.pk]
    # Not finished: last, whichever way.
    assert listed(client, sort="-duration") == [dear.pk, cheap.pk, unrun.pk]
    assert listed(client, sort="duration") == [cheap.pk, dear.pk, unrun.pk]
    assert listed(client) == [unrun.pk, dear.pk, cheap.pk]


def test_a_sort_link_keeps_the_filters_and_goes_back_to_page_one(client, workload, user):
    make(workload, user)
    client.force_login(user)
    response = client.get(reverse("jobs:list"), {"status": "queued", "page": "1", "sort": "-cost"})
    columns = response.context["columns"]
    assert columns["cost"]["aria_sort"] == "descending"
    assert parse_qs(urlsplit(columns["cost"]["url"]).query) == {
        "status": ["queued"],
        "sort": ["cost"],
    }
    assert parse_qs(urlsplit(columns["attempts"]["url"]).query)["sort"] == ["-attempts"]
    body = response.content.decode()
    assert 'aria-sort="descending"' in body
    assert 'name="sort" value="-cost"' in body


def test_pagination_keeps_filters_and_sort(client, workload, user, settings):
    settings.AIQUEUE_JOBS_PER_PAGE = 1
    for _ in range(2):
        make(workload, user)
    client.force_login(user)
    body = client.get(reverse("jobs:list"), {"status": "queued", "sort": "cost"}).content.decode()
    assert "?status=queued&amp;sort=cost&amp;page=2" in body


def test_the_list_shows_attempts_run_time_and_error_class(client, workload, user):
    now = timezone.now()
    make(
        workload, user, attempt_count=2, error_class="timeout", status="failed",
        started_at=now - timedelta(seconds=3), finished_at=now,
    )  # fmt: skip
    client.force_login(user)
    body = client.get(reverse("jobs:list")).content.decode()
    assert "<td>timeout</td>" in body.replace("<td hx-disable>", "<td>")
    assert "3.00 s" in body


def test_a_history_restore_gets_the_whole_page(client, workload, user):
    make(workload, user)
    client.force_login(user)
    partial = client.get(reverse("jobs:list"), headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial
    restore = client.get(
        reverse("jobs:list"),
        {"status": "queued"},
        headers={"HX-Request": "true", "HX-History-Restore-Request": "true"},
    ).content.decode()
    assert "<html" in restore
    assert '<option value="queued" selected>' in restore


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0, "0 s ago"), (42, "42 s ago"), (185, "3 min 5 s ago"), (7500, "2 h 5 min ago"),
     (90000, "1 d 1 h ago"), (-3, "just now")],
)  # fmt: skip
def test_relative_times_count_seconds(seconds, said):
    moment = timezone.now() - timedelta(seconds=seconds, milliseconds=100 if seconds >= 0 else 0)
    rendered = Template("{% load time_tags %}{{ moment|ago }}").render(Context({"moment": moment}))
    assert rendered == said
