"""Websocket routes. Consumers live in their apps; this file only lists them."""

from django.urls import path

from batches.consumers import BatchConsumer
from jobs.consumers import JobConsumer, JobListConsumer
from review.consumers import ReviewInboxConsumer

websocket_urlpatterns = [
    path("ws/jobs/<uuid:code>/", JobConsumer.as_asgi()),
    path("ws/jobs/", JobListConsumer.as_asgi()),
    path("ws/batches/<uuid:code>/", BatchConsumer.as_asgi()),
    path("ws/review/", ReviewInboxConsumer.as_asgi()),
]
