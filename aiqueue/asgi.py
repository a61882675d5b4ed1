"""ASGI entry point: HTTP through Django's WSGI handler on a fixed pool of threads, websockets
through Channels.

Django's own ASGI handler runs each sync request in a thread made for it (a new database
connection each time, so CONN_MAX_AGE does nothing) and hops between the event loop and
threads once per middleware: 8.5–9 ms of CPU per API submission here, against 4.6–5.4 ms for
the same code under a threaded WSGI server (bench/submit.py). a2wsgi's bridge gives the WSGI
handler AIQUEUE_WEB_THREADS long-lived threads in this same process, so the pages and the
websockets keep one port and one origin.
"""

# The WSGI application first: it sets the settings module up and fills the app registry,
# which the consumers' imports need.
from aiqueue.wsgi import application as wsgi_application

# isort: split
from a2wsgi import WSGIMiddleware  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from aiqueue.bulkhead import SubmissionBulkhead  # noqa: E402
from aiqueue.routing import websocket_urlpatterns  # noqa: E402

http = WSGIMiddleware(wsgi_application, workers=settings.AIQUEUE_WEB_THREADS)
websocket = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))

application = ProtocolTypeRouter(
    {
        # A burst of submissions must not take every thread the pages need (aiqueue.bulkhead).
        "http": SubmissionBulkhead(http, settings.AIQUEUE_SUBMIT_CONCURRENCY),
        "websocket": websocket,
    }
)
