"""Websocket routes. Consumers live in their apps; this file only lists them."""

from django.urls import path

from jobs.consumers import JobConsumer, JobListConsumer

websocket_urlpatterns = [
    path("ws/jobs/<uuid:code>/", JobConsumer.as_asgi()),
    path("ws/jobs/", JobListConsumer.as_asgi()),
]
