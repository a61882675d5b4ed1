"""A new API token's key is shown once, on a page (issue 18, defect 4): never in a cookie (the
messages framework kept it in the readable `messages` cookie), a URL, the session or a log."""

from __future__ import annotations

import logging

from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session

from jobs.models import ApiToken


def test_a_new_tokens_key_is_on_the_page_and_nowhere_else(client, db, caplog):
    admin = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    caplog.set_level(logging.DEBUG)

    response = client.post("/admin/jobs/apitoken/add/", {"user": admin.pk, "name": "ci"})

    assert response.status_code == 200  # the page itself, not a redirect to one
    page = response.content.decode()
    start = page.index('id="api-token-key"')
    key = page[page.index(">", start) + 1 : page.index("</code>", start)]
    token = ApiToken.objects.get()
    assert ApiToken.hash_key(key) == token.digest
    assert "no-store" in response["Cache-Control"]
    for cookie in response.cookies.values():
        assert key not in cookie.value
        assert cookie.key != "messages"
    assert "Location" not in response
    for session in Session.objects.all():
        assert key not in str(session.get_decoded())
    assert not any(key in entry.change_message for entry in LogEntry.objects.all())
    assert key not in caplog.text
    # The next page shows no trace of it either.
    assert key not in client.get("/admin/jobs/apitoken/").content.decode()
    # And it works.
    response = client.get("/api/jobs/00000000-0000-0000-0000-000000000000",
                          headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert response.status_code == 404  # authenticated: no such job, not 401
