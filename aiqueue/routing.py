"""Websocket routes. Consumers live in their apps; this file only lists them."""

websocket_urlpatterns: list = []
