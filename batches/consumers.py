"""Websocket consumer of a batch's page: told when the batch or one of its jobs changed."""

from __future__ import annotations

from batches.views import visible_batches
from jobs import live
from jobs.consumers import LiveConsumer


class BatchConsumer(LiveConsumer):
    """``/ws/batches/<code>/``: one batch's page, for users who may see that batch."""

    def authorize(self, user) -> str | None:
        code = self.scope["url_route"]["kwargs"]["code"]
        batch = visible_batches(user).filter(code=code).first()
        return None if batch is None else live.batch_group(batch.pk)
