"""Create the Operators group the README names: members see every job and the dashboard's
health panel, use its controls, and adjust workloads, providers, prices and budgets in the
admin (for the admin they also need "Staff status", a user flag no group can give)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "Operators"
PERMISSIONS = [
    # The dashboard, every job, cancelling and releasing held jobs.
    ("jobs", "view_job"),
    ("jobs", "change_job"),
    # Pause / resume workloads; edit their limits.
    ("jobs", "view_workload"),
    ("jobs", "change_workload"),
    # Reset breakers, the simulator's faults; edit providers and their prices.
    ("jobs", "view_provider"),
    ("jobs", "change_provider"),
    ("jobs", "view_modelprice"),
    ("jobs", "add_modelprice"),
    ("jobs", "change_modelprice"),
    # Raise a budget, or set a new one.
    ("jobs", "view_budget"),
    ("jobs", "add_budget"),
    ("jobs", "change_budget"),
    # The ledger and the audit log, read-only.
    ("jobs", "view_attempt"),
    ("jobs", "view_jobevent"),
]


def create_group(apps, schema_editor):
    # Permissions are normally created after all migrations ran (post_migrate).
    app_config = apps.get_app_config("jobs")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP)
    for app_label, codename in PERMISSIONS:
        permission = Permission.objects.get(content_type__app_label=app_label, codename=codename)
        group.permissions.add(permission)


def remove_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=GROUP).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0009_i18_provider_key_var"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_group, remove_group)]
