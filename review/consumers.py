"""Websocket consumer of the review inbox: told when an item was escalated, claimed, released
or resolved."""

from __future__ import annotations

from jobs import live
from jobs.consumers import LiveConsumer
from review.roles import can_read


class ReviewInboxConsumer(LiveConsumer):
    """``/ws/review/``: the inbox, for those who may read it."""

    def authorize(self, user) -> str | None:
        return live.REVIEW_GROUP if can_read(user) else None
