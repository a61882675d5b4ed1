"""BENCHMARK ONLY: the synchronous baseline (bench/sync_baseline.py) as a WSGI application.

bench/spike.py serves it with the same server, uvicorn, through its WSGI interface, which runs
requests in a fixed pool of 10 threads, as a threaded WSGI deployment does. That is the
starvation the spike scenario is about; under Django's ASGI handler every sync request gets a
thread of its own instead (see docs/benchmarks.md, "spike").
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.sync_baseline_settings")

application = get_wsgi_application()
