"""BENCHMARK ONLY: aiqueue's settings plus the synchronous baseline view (bench/sync_baseline.py).
Used by bench/spike.py as DJANGO_SETTINGS_MODULE for the baseline's web server."""

from aiqueue.settings import *  # noqa: F403

ROOT_URLCONF = "bench.sync_baseline"
