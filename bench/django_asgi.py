"""The web app as served before aiqueue/asgi.py bridged HTTP to Django's WSGI handler: HTTP
through Django's own ASGI handler (a thread per request), websockets through Channels. Only
for the benches' "before" rows (bench/submit.py, bench/live.py --burst)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from aiqueue.asgi import websocket  # noqa: E402
from aiqueue.bulkhead import SubmissionBulkhead  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": SubmissionBulkhead(django_asgi_app, settings.AIQUEUE_SUBMIT_CONCURRENCY),
        "websocket": websocket,
    }
)
