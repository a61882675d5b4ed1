"""The submission bulkhead (aiqueue.bulkhead): at most N submissions run at once in a web
process; other requests are never held behind them."""

from __future__ import annotations

import asyncio

from aiqueue.bulkhead import SubmissionBulkhead


class SlowApp:
    """An ASGI app that holds each request until released, counting how many are inside."""

    def __init__(self) -> None:
        self.inside = 0
        self.peak = 0
        self.release = asyncio.Event()
        self.served: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            if scope["path"] != "/operator/held/release/":
                await self.release.wait()
            self.served.append(scope["path"])
        finally:
            self.inside -= 1


def http(method: str, path: str) -> dict:
    return {"type": "http", "method": method, "path": path}


async def _nothing():
    return {}


async def _ignore(message) -> None:
    return None


def test_at_most_the_limit_of_submissions_run_at_once_and_others_pass():
    async def scenario() -> tuple[SlowApp, list[str]]:
        app = SlowApp()
        bulkhead = SubmissionBulkhead(app, limit=2)
        submissions = [
            asyncio.create_task(bulkhead(http("POST", path), _nothing, _ignore))
            for path in ["/api/jobs"] * 6 + ["/jobs/new/", "/batches/new/"]
        ]
        await asyncio.sleep(0.05)
        assert app.inside == 2  # two submissions in, six waiting without running
        # Meanwhile an operator's action and a page load are not held behind the burst.
        await asyncio.wait_for(
            bulkhead(http("POST", "/operator/held/release/"), _nothing, _ignore), 1
        )
        page = asyncio.create_task(bulkhead(http("GET", "/api/jobs"), _nothing, _ignore))
        await asyncio.sleep(0.05)
        assert app.inside == 3  # the GET went straight in
        app.release.set()
        await asyncio.gather(*submissions, page)
        return app, app.served

    app, served = asyncio.run(scenario())
    assert app.peak == 3  # 2 submissions + the GET; never more submissions than the limit
    assert served[0] == "/operator/held/release/"
    assert served.count("/api/jobs") == 7  # every submission was served in the end


def test_a_limit_of_zero_holds_nothing():
    async def scenario() -> int:
        app = SlowApp()
        bulkhead = SubmissionBulkhead(app, limit=0)
        tasks = [asyncio.create_task(bulkhead(http("POST", "/api/jobs"), _nothing, _ignore))
                 for _ in range(5)]  # fmt: skip
        await asyncio.sleep(0.05)
        inside = app.inside
        app.release.set()
        await asyncio.gather(*tasks)
        return inside

    assert asyncio.run(scenario()) == 5
