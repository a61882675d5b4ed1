"""Websocket consumers: thin. Check who may listen, join the right group, forward what the
workers publish (jobs.live renders it; nothing is rendered here).

A connection that may not listen is accepted and closed at once with code 4403, rather than
refused during the handshake: browsers report a refused handshake as 1006, which the htmx ws
extension treats as a network failure and retries forever; 4403 ends it.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from jobs import live
from jobs.access import can_change_job, visible_jobs

FORBIDDEN = 4403

# The messages the workers publish: rendered HTML to forward, no database work.
PUSHED = frozenset({"job.update", "job.output", "jobs.update", "live.stale"})


class LiveConsumer(AsyncWebsocketConsumer):
    """Base of every page's consumer: joins the one group `authorize` names, or closes 4403."""

    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined = []
        user = self.scope.get("user")
        group = None
        if user is not None and user.is_authenticated:
            group = await database_sync_to_async(self.authorize)(user)
        if group is None:
            await self.accept()
            await self.close(code=FORBIDDEN)
            return
        # Join before accepting: the page re-fetches its state when the socket opens, so
        # anything committed after that re-fetch must already reach this connection.
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.append(group)
        await self.accept()

    def authorize(self, user) -> str | None:
        """Return the group this user may join, or None. Runs in a thread (ORM)."""
        raise NotImplementedError

    async def dispatch(self, message: dict) -> None:
        # Channels closes stale database connections before every handler, in the process's
        # one thread for sync code: each pushed frame waited its turn there (under a burst, 40
        # list sockets' frames and every job page's update, each hop a wait for the GIL), and
        # the forwarding handlers touch no database. The ORM calls here go through
        # database_sync_to_async, which closes stale connections around each call itself.
        if message["type"] in PUSHED:
            await getattr(self, get_handler_name(message))(message)
        else:
            await super().dispatch(message)

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def live_stale(self, event: dict) -> None:
        """The page's live region changed (jobs.live.stale_on_commit): it re-fetches it."""
        await self.send(text_data=event["html"])


class JobConsumer(LiveConsumer):
    """``/ws/jobs/<code>/``: one job's page, for users who may see that job."""

    def authorize(self, user) -> str | None:
        code = self.scope["url_route"]["kwargs"]["code"]
        job = visible_jobs(user).filter(code=code).first()
        if job is None:
            return None
        self.actions_variant = "change" if can_change_job(user, job) else "view"
        return live.job_group(job.code)

    async def job_update(self, event: dict) -> None:
        await self.send(text_data=event["html"] + event["actions"][self.actions_variant])

    async def job_output(self, event: dict) -> None:
        await self.send(text_data=event["html"])


class JobListConsumer(LiveConsumer):
    """``/ws/jobs/?parts=row,counters``: the job list and the dashboard. Operators follow every
    job, everyone else only their own; the page names the parts it has targets for."""

    def authorize(self, user) -> str | None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        wanted = {name for value in query.get("parts", []) for name in value.split(",")}
        known = [*live.LIST_PARTS, live.NEW_JOB_PART]
        self.parts = [name for name in known if name in wanted] or list(live.LIST_PARTS)
        return live.list_group_for(user)

    async def jobs_update(self, event: dict) -> None:
        # One frame carries every job that changed since the last (jobs.live_batch); a
        # process not yet upgraded sends one job's `parts`.
        items = event.get("items") or [event.get("parts", {})]
        html = "".join(item[name] for item in items for name in self.parts if name in item)
        if html:
            await self.send(text_data=html)
