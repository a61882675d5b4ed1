"""Liveness and readiness probes for load balancers and orchestrators. No login: they reveal
nothing but whether the process, the database and Redis answer.

- ``/healthz``: the process serves requests (no dependency is touched, so a database outage
  does not get every web process restarted).
- ``/readyz``: the database and Redis both answer; otherwise 503 naming the one that failed,
  so traffic goes elsewhere until they are back.
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

log = logging.getLogger(__name__)

# A probe must answer fast even when a dependency hangs.
REDIS_TIMEOUT_S = 2.0


def check_database() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:  # noqa: BLE001 - any failure means not ready
        log.warning("readiness: database check failed", exc_info=True)
        return False
    return True


def check_redis() -> bool:
    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        log.warning("readiness: redis check failed", exc_info=True)
        return False
    finally:
        client.close()


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@login_not_required
@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    # Details of a failure (hosts, messages) go to the log, not to an unauthenticated caller.
    checks = {
        "database": "ok" if check_database() else "unreachable",
        "redis": "ok" if check_redis() else "unreachable",
    }
    ready = all(value == "ok" for value in checks.values())
    failed = [name for name, value in checks.items() if value != "ok"]
    return JsonResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks, "failed": failed},
        status=200 if ready else 503,
    )
