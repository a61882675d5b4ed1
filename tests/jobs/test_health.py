"""/healthz and /readyz: no login; readiness names the dependency that failed."""

from __future__ import annotations

import pytest
from django.db import OperationalError

from aiqueue.redis_server import free_port
from ops import health


def test_healthz_answers_without_login(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_ready_when_database_and_redis_answer(client, db, redis_conn):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_fails_when_redis_is_down(client, db, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["redis"]
    assert body["checks"] == {"database": "ok", "redis": "unreachable"}


class BrokenConnection:
    def cursor(self):
        raise OperationalError("connection refused")


def test_readyz_fails_when_the_database_is_down(client, db, redis_conn, monkeypatch):
    monkeypatch.setattr(health, "connection", BrokenConnection())
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["database"]
    # What went wrong is logged, not told to an anonymous caller.
    assert "refused" not in response.content.decode()


@pytest.mark.parametrize("url", ["/healthz", "/readyz"])
def test_probes_refuse_writes(client, db, url):
    assert client.post(url).status_code == 405
