"""Create the `admin` superuser once. The password comes from AIQUEUE_ADMIN_PASSWORD, or is
generated and printed this one time (it is not stored anywhere else); its e-mail address, to
which review digests go, from AIQUEUE_ADMIN_EMAIL (none if unset: the review inbox then says
that nobody is told)."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin superuser if it does not exist."

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            self.stdout.write("admin user exists")
            return
        password = os.environ.get("AIQUEUE_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        email = os.environ.get("AIQUEUE_ADMIN_EMAIL", "")
        User.objects.create_superuser("admin", email, password)
        if not email:
            self.stdout.write(
                "admin has no e-mail address: set AIQUEUE_ADMIN_EMAIL (or add one in the admin) "
                "to be told of items waiting for review"
            )
        if os.environ.get("AIQUEUE_ADMIN_PASSWORD"):
            self.stdout.write("created admin user (password from AIQUEUE_ADMIN_PASSWORD)")
        else:
            self.stdout.write(
                self.style.WARNING(f"created admin user; password (shown once): {password}")
            )
