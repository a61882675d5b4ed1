"""WSGI entry point: HTTP through Django only (no websockets; those need aiqueue.asgi).

The standard Django WSGI application, for serving the HTTP side (the API's submissions in
particular) with a threaded WSGI server. Unlike aiqueue.asgi it has no SubmissionBulkhead:
a WSGI server's fixed thread pool bounds the requests in flight instead.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")

application = get_wsgi_application()
