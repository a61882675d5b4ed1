"""The roles the README names exist after `migrate`, with the permissions it lists (issue 18,
defect 10: only Reviewers was created, so a fresh install had no way to grant the operator
role as documented)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User

from tests.helpers import documented_roles


def test_the_readme_names_both_groups():
    assert set(documented_roles()) == {"Operators", "Reviewers"}


@pytest.mark.parametrize("name", ["Operators", "Reviewers"])
def test_each_documented_group_exists_after_migrate_with_its_permissions(db, name):
    group = Group.objects.get(name=name)
    granted = {
        f"{app}.{codename}"
        for app, codename in group.permissions.values_list("content_type__app_label", "codename")
    }
    assert granted == documented_roles()[name]


def test_an_operator_made_as_documented_can_use_the_dashboard_and_the_admin(client, db):
    user = User.objects.create_user("opal", "opal@example.com", "pw-opal-123", is_staff=True)
    user.groups.add(Group.objects.get(name="Operators"))
    client.force_login(user)
    assert "dashboard-live" in client.get("/").content.decode()
    for url in ("/admin/jobs/budget/add/", "/admin/jobs/workload/", "/admin/jobs/provider/"):
        assert client.get(url).status_code == 200, url
    assert client.get("/admin/auth/user/").status_code == 403  # not the users'
