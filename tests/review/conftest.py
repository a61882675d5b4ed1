"""Review fixtures: reviewers, a reader, workloads that escalate, and jobs driven into review
by the real runner against the simulator."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission, User

from jobs import services
from jobs.models import Job, Workload
from review.models import REVIEWERS_GROUP, ReviewItem

LABELS = ["spam", "ham"]


def reviewers_group() -> Group:
    # Transactional tests flush the data migration's group, so build it the same way here.
    group, _ = Group.objects.get_or_create(name=REVIEWERS_GROUP)
    group.permissions.add(
        *Permission.objects.filter(
            content_type__app_label__in=["review", "jobs"],
            codename__in=["view_reviewitem", "change_reviewitem", "view_job"],
        )
    )
    return group


def make_reviewer(username: str) -> User:
    user = User.objects.create_user(username, f"{username}@example.com", f"pw-{username}-123")
    user.groups.add(reviewers_group())
    return user


@pytest.fixture
def reviewer(db) -> User:
    return make_reviewer("rita")


@pytest.fixture
def second_reviewer(db) -> User:
    return make_reviewer("ravi")


@pytest.fixture
def reader(db) -> User:
    """Someone who may look at the inbox (view permission) but is not a reviewer."""
    user = User.objects.create_user("rob", "rob@example.com", "pw-rob-123")
    user.user_permissions.add(Permission.objects.get(codename="view_reviewitem"))
    return user


@pytest.fixture
def classify_workload(provider) -> Workload:
    return Workload.objects.create(
        name="Spam filter",
        kind=Workload.Kind.CLASSIFY,
        system_prompt="Classify the message.\nLabels: " + ", ".join(LABELS),
        provider=provider,
        model="sim-small",
        labels=LABELS,
        confidence_threshold=0.5,
        max_output_tokens=5,
    )


@pytest.fixture
def extract_workload(provider) -> Workload:
    return Workload.objects.create(
        name="Invoice fields",
        kind=Workload.Kind.EXTRACT,
        system_prompt="Extract the invoice fields as JSON.",
        provider=provider,
        model="sim-small",
        max_output_tokens=200,
    )


def submit(workload: Workload, user, text: str) -> Job:
    return services.do_submit_job(workload=workload, input_text=text, user=user)[0]


@pytest.fixture
def escalate(run_worker, user):
    """Submit jobs and run the real worker until the queues are empty; return their items."""

    def run(workload: Workload, *texts: str) -> list[ReviewItem]:
        jobs = [submit(workload, user, text) for text in texts]
        run_worker()
        items = []
        for job in jobs:
            job.refresh_from_db()
            assert job.status == Job.Status.NEEDS_REVIEW, (job.status, job.error)
            items.append(ReviewItem.objects.get(job=job, status=ReviewItem.Status.OPEN))
        return items

    return run
