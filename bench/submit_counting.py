"""BENCHMARK ONLY: aiqueue's ASGI and WSGI apps with counters, for bench/submit.py.

`asgi` and `wsgi` are aiqueue.asgi.application and aiqueue.wsgi.application, unchanged, plus:
every database connection Django opens is counted (`connection_created`) and gets an execute
wrapper that counts its statements by their first word; the thread each request's view code
ran in is recorded (by its native id), and so are the statements of the latest request.
GET /_bench/counts answers all that as JSON (and is not counted).

bench/submit.py serves these only in its counting pass, never in the pass that measures CPU.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")

COUNTS_PATH = "/_bench/counts"
_lock = threading.Lock()
_statements: Counter[str] = Counter()
_connections = [0]
_threads: set[int] = set()
_requests = [0]


_last: list[str] = []  # the statements of the latest request, in order


def _count_statement(execute, sql, params, many, context):
    word = (sql or "").lstrip().split(None, 1)[0].upper() if sql else "?"
    with _lock:
        _statements[word] += 1
        _last.append(" ".join((sql or "").split())[:160])
    return execute(sql, params, many, context)


def _on_connection(sender, connection, **kwargs) -> None:
    with _lock:
        _connections[0] += 1
    if _count_statement not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count_statement)


def _on_request_started(sender, **kwargs) -> None:
    with _lock:
        _last.clear()
        _requests[0] += 1
        _threads.add(threading.get_native_id())


def _snapshot() -> bytes:
    with _lock:
        return json.dumps(
            {
                "statements": dict(_statements),
                "connections": _connections[0],
                "requests": _requests[0],
                "threads": len(_threads),
                "last": list(_last),
            }
        ).encode()


def _install() -> None:
    from django.core.signals import request_started
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection, weak=False)
    request_started.connect(_on_request_started, weak=False)


def _wrap_asgi(app):
    async def counted(scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == COUNTS_PATH:
            body = _snapshot()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return counted


def _wrap_wsgi(app):
    def counted(environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:
            body = _snapshot()
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return app(environ, start_response)

    return counted


def __getattr__(name: str):
    """`asgi` / `wsgi`, built on first use, so a server imports only the one it serves."""
    if name == "asgi":
        from aiqueue.asgi import application

        _install()
        globals()["asgi"] = app = _wrap_asgi(application)
        return app
    if name == "django_asgi":
        from bench.django_asgi import application

        _install()
        globals()["django_asgi"] = app = _wrap_asgi(application)
        return app
    if name == "wsgi":
        from aiqueue.wsgi import application

        _install()
        globals()["wsgi"] = app = _wrap_wsgi(application)
        return app
    raise AttributeError(name)
