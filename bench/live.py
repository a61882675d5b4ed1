"""Benchmark "live": from a worker's publish to a websocket client receiving it.

    .venv/bin/python bench/live.py [--messages 500] [--quick]

Starts its own Redis, a fresh SQLite database and uvicorn (bench.common.Stack). The job is run
once first (so its page has an attempt, output and history to render). This process plays the
worker: it publishes with the real code in jobs.live, one message at a time, and a
websocket client logged in as the job's owner (a thread here, connected to /ws/jobs/<code>/
through uvicorn and the Channels consumer) records when each one arrives. Latency = arrival -
start of the publish call, so rendering is included where the row says so. Rows, in one run:

    bare group_send        async_to_sync(layer.group_send) of a fixed string (FIELD-NOTES' way:
                           a new event loop and Redis connection per call)
    live.send              the same fixed string through jobs.live.send (one long-lived loop)
    output (stream)        jobs.live.render_output + send: what each throttled token publish does
    publish_job            jobs.live.publish_job, called as on commit (with the worker's Job): who
                           listens, the job's row re-read, every partial of the job page, the
                           list row and counters for two list groups, 3 group_sends (the job
                           page's message goes out before the list parts are rendered)
    ... -> the list page   the same publish, timed to a second client on /ws/jobs/ (row+counters)

--quick sends 100 messages per row instead of 500.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, percentile, print_table  # noqa: E402

WARMUP = 20


def client_process(url: str, cookie: str, origin: str, pipe) -> None:
    """A websocket client in a process of its own (so it never waits for the publisher's GIL):
    sends time.perf_counter() at each message's arrival (CLOCK_MONOTONIC: one clock for all
    processes on this machine) and the message's size, through `pipe`."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(url, additional_headers={"Cookie": cookie, "Origin": origin}) as socket:
        pipe.send(("ready", 0))
        try:
            for message in socket:
                pipe.send((time.perf_counter(), len(message)))
        except ConnectionClosed:
            pass


class Client:
    def __init__(self, url: str, cookie: str, origin: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        self.process = context.Process(
            target=client_process, args=(url, cookie, origin, child_end), daemon=True
        )
        self.process.start()
        if not self.pipe.poll(30) or self.pipe.recv()[0] != "ready":
            raise RuntimeError(f"websocket client for {url} did not connect")
        self.last_size = 0

    def arrival(self, timeout: float = 5) -> float:
        if not self.pipe.poll(timeout):
            raise RuntimeError("a message never arrived")
        arrived, self.last_size = self.pipe.recv()
        return arrived

    def close(self) -> None:
        self.process.terminate()
        self.process.join(timeout=5)


def measure(client: Client, publish, count: int) -> list[float]:
    latencies = []
    for i in range(WARMUP + count):
        started = time.perf_counter()
        publish()
        arrived = client.arrival()
        if i >= WARMUP:
            latencies.append((arrived - started) * 1000)
    return latencies


def summary(latencies: list[float]) -> tuple:
    return (
        len(latencies),
        percentile(latencies, 50),
        percentile(latencies, 95),
        percentile(latencies, 99),
        max(latencies),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="100 messages per row")
    args = parser.parse_args()
    count = 100 if args.quick else args.messages

    with Stack() as stack:
        stack.django()
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        from jobs import live, services
        from jobs.models import Job

        workload = stack.make_workload()
        user = stack.user("bench", superuser=False)
        job = services.do_submit_job(
            workload=workload,
            input_text="Quarterly notes: hiring, budget, the new billing page. " * 20,
            user=user,
        )[0]
        # Run it once with the real worker code, so the page has what a finished job shows: an
        # attempt in the ledger, the output and a history of several events.
        from jobs.worker import build_worker

        build_worker(threads=1).work(burst=True, logging_level="WARNING", with_scheduler=False)
        # The worker's copy of the job, loaded as jobs.runner loads it.
        job = Job.objects.select_related("workload__provider", "submitted_by").get(pk=job.pk)
        assert job.status == "succeeded", job.status
        web = stack.start_web(workers=1)
        http = stack.login_client(web, "bench")
        cookie = f"sessionid={http.cookies['sessionid']}"
        ws = web.replace("http://", "ws://")
        client = Client(f"{ws}/ws/jobs/{job.code}/", cookie, origin=web)
        time.sleep(0.2)  # margin for group_add after the accept

        group = live.job_group(job.code)
        fixed = {"type": "job.output", "html": '<p id="bench">fixed</p>'}
        layer = get_channel_layer()
        streamed = "The meeting covered hiring and the budget for the next quarter. " * 8

        rows = []

        def bare() -> None:
            async_to_sync(layer.group_send)(group, fixed)

        def stream_output() -> None:
            live.send([(group, live.render_output(job, streamed))])

        cases = [
            ("bare group_send (fixed string)", bare),
            ("live.send (fixed string)", lambda: live.send([(group, fixed)])),
            ("output (stream): render + send", stream_output),
            # As jobs.services calls it on commit: with the worker's Job (row re-read).
            ("publish_job: render all + 3 sends", lambda: live.publish_job(job)),
        ]
        for name, publish in cases:
            rows.append((name, *summary(measure(client, publish, count))))
        size = client.last_size
        client.close()

        # The same publish, timed to a job list page (its message goes out second).
        list_client = Client(f"{ws}/ws/jobs/?parts=row,counters", cookie, origin=web)
        time.sleep(0.2)
        latencies = measure(list_client, cases[-1][1], count)
        rows.append(("publish_job -> the list page", *summary(latencies)))
        list_client.close()

    print_table(
        ["publish", "messages", "p50 ms", "p95 ms", "p99 ms", "max ms"],
        rows,
        title=f"live: worker publish -> websocket client (uvicorn, 1 client, "
        f"publish_job message {size:,} bytes)",
    )
    print("\ntarget: publish_job p50 <= 10 ms, p95 <= 20 ms")


if __name__ == "__main__":
    main()
