from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from jobs import api, prepared, services
from jobs.models import ApiToken, Job, Provider, Workload
from runs import runner


def fields_of(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_the_token_read_matches_the_orm(token, user):
    ApiToken.objects.update(last_used_at=timezone.now())  # a datetime column, converted
    user.groups.add(Group.objects.get_or_create(name="submitters")[0])
    digest = ApiToken.hash_key(token)

    found = api.TOKEN_WITH_USER.get([digest, True])
    orm = ApiToken.objects.select_related("user").get(digest=digest, user__is_active=True)
    assert fields_of(found) == fields_of(orm)
    assert fields_of(found.user) == fields_of(orm.user)
    assert found.last_used_at is not None
    assert ApiToken.user.field.is_cached(found)  # no second query for request.user
    assert found.user.has_perm("jobs.add_job") == orm.user.has_perm("jobs.add_job")


def test_the_token_read_finds_nothing_for_a_deleted_token_or_an_inactive_user(token, user):
    digest = ApiToken.hash_key(token)
    user.is_active = False
    user.save()
    assert api.TOKEN_WITH_USER.get([digest, True]) is None
    user.is_active = True
    user.save()
    ApiToken.objects.all().delete()
    assert api.TOKEN_WITH_USER.get([digest, True]) is None


def test_a_deleted_token_is_refused_by_the_next_request(client, token, workload):
    headers = {"Authorization": f"Bearer {token}"}
    body = json.dumps({"workload": workload.name, "input": "x"})
    assert client.post("/api/jobs", body, "application/json", headers=headers).status_code == 202
    ApiToken.objects.all().delete()
    assert client.post("/api/jobs", body, "application/json", headers=headers).status_code == 401
    assert Job.objects.count() == 1


def test_the_workload_reads_match_the_orm(workload):
    workload.labels = ["spam", "ham"]  # a JSON column, converted
    workload.save()
    orm = Workload.objects.select_related("provider").get(pk=workload.pk)
    for found in (
        api.WORKLOAD_BY_NAME.get([workload.name]),
        api.WORKLOAD_BY_PK.get([workload.pk]),
    ):
        assert fields_of(found) == fields_of(orm)
        assert fields_of(found.provider) == fields_of(orm.provider)
        assert Workload.provider.field.is_cached(found)
    assert api.WORKLOAD_BY_NAME.get(["no such workload"]) is None


def test_a_paused_workload_is_refused_by_the_next_submission(client, token, workload):
    headers = {"Authorization": f"Bearer {token}"}
    body = json.dumps({"workload": workload.name, "input": "x"})
    assert client.post("/api/jobs", body, "application/json", headers=headers).status_code == 202
    Workload.objects.filter(pk=workload.pk).update(is_paused=True)
    assert client.post("/api/jobs", body, "application/json", headers=headers).status_code == 503


def test_a_nullable_key_is_a_left_join_and_caches_none_as_select_related_does(workload):
    select = prepared.Select([(Workload, None), (Provider, "fallback_provider")], "t0.id = %s")
    found = select.get([workload.pk])
    assert found is not None  # an INNER JOIN would lose the workload without a fallback
    assert Workload.fallback_provider.field.is_cached(found)
    assert found.fallback_provider is None


def test_the_runs_job_read_matches_the_orm_with_and_without_a_submitter(workload, user):
    with_user = services.do_submit_job(workload=workload, input_text="a", user=user)[0]
    without = services.do_submit_job(workload=workload, input_text="b", user=user)[0]
    Job.objects.filter(pk=without.pk).update(submitted_by=None, started_at=timezone.now())
    for job in (with_user, without):
        found = runner._read_job(str(job.code))
        orm = Job.objects.select_related("workload__provider", "submitted_by").get(pk=job.pk)
        assert fields_of(found) == fields_of(orm)
        assert fields_of(found.workload) == fields_of(orm.workload)
        assert fields_of(found.workload.provider) == fields_of(orm.workload.provider)
        assert Job.workload.field.is_cached(found)
        assert Workload.provider.field.is_cached(found.workload)
        assert Job.submitted_by.field.is_cached(found)
        if orm.submitted_by is None:
            assert found.submitted_by is None
        else:
            assert fields_of(found.submitted_by) == fields_of(orm.submitted_by)
    assert runner._read_job("00000000-0000-0000-0000-000000000000") is None
    assert runner._read_job("not a code") is None


def test_a_path_that_leads_elsewhere_is_refused(db):
    select = prepared.Select([(Job, None), (Provider, "workload")], "t0.id = %s")
    with pytest.raises(ValueError, match="does not lead to Provider"):
        select.get([1])
