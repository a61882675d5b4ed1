"""ASGI entry point: HTTP through Django, websockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")
# Build the Django app first: it sets up the app registry that the consumers' imports need.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from aiqueue.bulkhead import SubmissionBulkhead  # noqa: E402
from aiqueue.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # A burst of submissions must not starve the pages people look at (aiqueue.bulkhead).
        "http": SubmissionBulkhead(django_asgi_app, settings.AIQUEUE_SUBMIT_CONCURRENCY),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
