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

    .venv/bin/python bench/live.py --burst [--jobs 1000] [--lists 40] [--pages 10]

The burst scenario: `--lists` job-list sockets and `--pages` job-page sockets open while
`--jobs` API submissions arrive (20 senders) and two workers run them. Every 100 ms this
process changes one watched job (a progress message carrying a probe number): a job page's
latency is from that change to its page receiving it. Per list socket: frames per second over
the burst, whether the page ends on every job's final state (per job, the newest row it was
sent, by the row's data-version, as static/js/live.js applies them), and sockets that closed
under the burst. Three runs in one invocation (VARIANTS): a frame per change
(AIQUEUE_LIVE_LIST_INTERVAL_MS=0) and coalesced frames (250 ms) with HTTP through Django's own
ASGI handler (bench/django_asgi.py, as before), and coalesced with HTTP through Django's WSGI
handler on a pool of threads (aiqueue/asgi.py, as served now).
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
CLOSED = "closed: "  # what the burst's collector records when a socket closes under it


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


def collector_process(urls: list[str], cookie: str, origin: str, pipe) -> None:
    """Many websocket clients in one process (one thread each): records (socket index,
    arrival, text) of every message and sends them all through `pipe` when told to stop."""
    import threading

    from websockets.sync.client import connect

    received: list[tuple[int, float, str]] = []
    lock = threading.Lock()
    sockets = []
    for url in urls:
        sockets.append(connect(url, additional_headers={"Cookie": cookie, "Origin": origin}))

    def read(index: int, socket) -> None:
        try:
            for message in socket:
                arrived = time.perf_counter()
                with lock:
                    received.append((index, arrived, message))
        except Exception as error:  # noqa: BLE001 - the socket closed
            with lock:
                received.append((index, time.perf_counter(), f"{CLOSED}{error!r}"))
            return

    threads = [
        threading.Thread(target=read, args=(i, sock), daemon=True) for i, sock in enumerate(sockets)
    ]
    for thread in threads:
        thread.start()
    pipe.send("ready")
    pipe.recv()  # stop
    with lock:
        pipe.send(list(received))
    for sock in sockets:
        sock.close()


def sender_process(base: str, key: str, workload: str, jobs: int, senders: int, pipe) -> None:
    """The API burst from a process of its own, so its threads never hold the GIL of the
    process that makes and times the probes. Sends back how many were accepted."""
    import threading

    import httpx

    counter = iter(range(jobs))
    accepted = []

    def send() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while (i := next(counter, None)) is not None:
                response = client.post(
                    "/api/jobs",
                    json={"workload": workload, "input": f"burst text {i}"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                if response.status_code in (200, 202):
                    accepted.append(i)

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pipe.send(len(accepted))


def burst_run(interval_ms: int, jobs: int, lists: int, pages: int, app: str) -> dict:
    import re
    import threading

    with Stack(env={"AIQUEUE_LIVE_LIST_INTERVAL_MS": str(interval_ms)}) as stack:
        stack.django()
        from django.conf import settings as django_settings

        from jobs import live, services
        from jobs.models import Job

        django_settings.AIQUEUE_LIVE_LIST_INTERVAL_MS = interval_ms
        workload = stack.make_workload()
        user = stack.user("bench", superuser=False)
        key = stack.api_token("bench")
        watched = [
            services.do_submit_job(workload=workload, input_text=f"watched {i}", user=user)[0]
            for i in range(pages)
        ]
        stack.start_workers(2, threads=20)
        stack.wait_until(
            lambda: stack.count_status([j.pk for j in watched], "succeeded") == pages, timeout=120
        )
        web = stack.start_web(workers=1, app=app)
        http = stack.login_client(web, "bench")
        cookie = f"sessionid={http.cookies['sessionid']}"
        ws = web.replace("http://", "ws://")
        urls = [f"{ws}/ws/jobs/?parts=row,counters,new"] * lists + [
            f"{ws}/ws/jobs/{job.code}/" for job in watched
        ]
        context = multiprocessing.get_context("spawn")
        # The list sockets share one process; each job page has a process of its own, as a
        # browser tab would: a page's frames must not queue behind 40 lists' for one GIL.
        collectors = []
        for group in [urls[:lists], *([url] for url in urls[lists:])]:
            pipe, child = context.Pipe()
            process = context.Process(target=collector_process, args=(group, cookie, web, child))
            process.start()
            collectors.append((pipe, process))
        for pipe, _ in collectors:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("the websocket clients did not connect")
        time.sleep(0.5)

        probes: dict[int, tuple[float, float, float]] = {}  # UPDATE sent, committed, published
        burst_over = threading.Event()

        def probe() -> None:
            number = 0
            while not burst_over.is_set():
                job = watched[number % pages]
                writing = time.perf_counter()
                # A change of the job's row, published as on commit (its page re-renders).
                # The change happens when it commits: under the burst, SQLite's write lock
                # can hold the UPDATE back by tens of ms, which is the database's wait and
                # not the page's, so both instants are kept and both latencies printed.
                Job.objects.filter(pk=job.pk).update(progress_message=f"probe-{number}-end")
                committed = time.perf_counter()
                live.publish_job(job)
                probes[number] = (writing, committed, time.perf_counter())
                number += 1
                time.sleep(0.1)

        started = time.perf_counter()
        sent_pipe, sender_end = context.Pipe()
        sender = context.Process(
            target=sender_process, args=(web, key, workload.name, jobs, 20, sender_end)
        )
        prober = threading.Thread(target=probe, name="probe")
        prober.start()
        sender.start()
        accepted = sent_pipe.recv()
        sender.join(timeout=10)
        codes = list(
            Job.objects.filter(input_text__startswith="burst text").values_list("pk", flat=True)
        )
        stack.wait_until(
            lambda: Job.objects.filter(pk__in=codes).exclude(status="succeeded").count() == 0,
            timeout=600,
        )
        ended = time.perf_counter()
        time.sleep(1.5)  # the last frames
        burst_over.set()
        prober.join()
        received = []
        for offset, (pipe, process) in enumerate(collectors):
            pipe.send("stop")
            # The first collector holds the lists (indexes 0..lists-1), then one per page.
            first = 0 if offset == 0 else lists + offset - 1
            received += [(first + index, at, text) for index, at, text in pipe.recv()]
            process.join(timeout=10)
        final = {
            str(code): "succeeded"
            for code in Job.objects.filter(pk__in=codes).values_list("code", flat=True)
        }

    latencies, from_write, from_sent = [], [], []
    for index, arrived, text in received:
        if index < lists:
            continue
        for match in re.finditer(r"probe-(\d+)-end", text):
            number = int(match.group(1))
            if number in probes and started <= probes[number][0] <= ended:
                from_write.append((arrived - probes[number][0]) * 1000)
                latencies.append((arrived - probes[number][1]) * 1000)
                from_sent.append((arrived - probes[number][2]) * 1000)
                break
    seconds = ended - started
    frames = [0] * lists
    # What each list page shows at the end: per job, the newest row it received (the highest
    # data-version; of equal ones the later), as static/js/live.js swaps them.
    shown: list[dict[str, tuple[int, str]]] = [{} for _ in range(lists)]
    status_of = re.compile(r'data-status="(\w+)"')
    version_of = re.compile(r'data-version="(\d+)"')
    closed = sum(text.startswith(CLOSED) for _, arrived, text in received if arrived <= ended)
    for index, arrived, text in received:
        if index >= lists:
            continue
        if started <= arrived <= ended + 1.5:
            frames[index] += 1
        for piece in text.split('<tr id="job-row-')[1:]:
            code, rest = piece.split('"', 1)
            row = rest[: rest.find("</tr>")]
            found, version = status_of.search(row), version_of.search(row)
            if found and version:
                seen = shown[index].get(code)
                if seen is None or int(version.group(1)) >= seen[0]:
                    shown[index][code] = (int(version.group(1)), found.group(1))
    complete = sum(
        all(seen.get(code, (0, ""))[1] == status for code, status in final.items())
        for seen in shown
    )
    return {
        "interval": interval_ms,
        "accepted": accepted,
        "seconds": seconds,
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        "p95": percentile(latencies, 95) if latencies else float("nan"),
        "write_p95": percentile(from_write, 95) if from_write else float("nan"),
        "sent_p95": percentile(from_sent, 95) if from_sent else float("nan"),
        "publish_p95": percentile([(c - b) * 1000 for _, b, c in probes.values()], 95),
        "probes": len(latencies),
        "frames_per_s": sum(frames) / lists / seconds,
        "complete": complete,
        "lists": lists,
        "closed": closed,
    }


BEFORE_APP = "bench.django_asgi:application"  # HTTP through Django's ASGI handler
VARIANTS = [
    ("a frame per change, Django's ASGI handler", 0, BEFORE_APP),
    ("coalesced 250 ms, Django's ASGI handler", 250, BEFORE_APP),
    ("coalesced 250 ms, WSGI handler on a pool (now)", 250, "aiqueue.asgi:application"),
]


def burst_main(args) -> None:
    import json
    import subprocess

    rows = []
    for label, interval, app in VARIANTS:
        # Each in a process of its own: Django is set up once per process, on one Stack.
        out = subprocess.run(
            [sys.executable, __file__, "--burst-interval", str(interval), "--jobs", str(args.jobs),
             "--lists", str(args.lists), "--pages", str(args.pages), "--burst-app", app],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        rows.append(
            (
                label,
                result["accepted"],
                f"{result['seconds']:.1f}",
                result["probes"],
                result["p50"],
                result["p95"],
                result["write_p95"],
                result["publish_p95"],
                result["sent_p95"],
                f"{result['frames_per_s']:.1f}",
                f"{result['complete']} / {result['lists']}",
                result["closed"],
            )
        )
    print_table(
        ["list updates", "jobs", "burst s", "probes", "job page p50 ms", "p95 ms",
         "p95 from the write's start ms", "publish p95 ms", "after publish p95 ms",
         "frames/s per list", "lists with every final state",
         "sockets dropped"],
        rows,
        title=f"live under a burst: {args.jobs} API submissions, {args.lists} list sockets, "
        f"{args.pages} job-page sockets",
    )  # fmt: skip
    print(
        "\njob page: from the change's commit to its frame at the page's socket; the next column"
        " counts from the start of the UPDATE (SQLite's write-lock wait included); publish: the"
        " publisher's render and send (jobs.live.publish_job); after publish: from its return to"
        " the frame's arrival (Redis, the web process, the client)"
        "\ntarget: job page p95 <= 50 ms during the burst; every list ends on every final state"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="100 messages per row")
    parser.add_argument("--burst", action="store_true", help="the burst scenario")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--lists", type=int, default=40)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--burst-interval", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--burst-app", default="aiqueue.asgi:application", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.burst_interval is not None:
        import json

        result = burst_run(args.burst_interval, args.jobs, args.lists, args.pages, args.burst_app)
        print(json.dumps(result))
        return
    if args.burst:
        burst_main(args)
        return
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
        from runs.worker import build_worker

        build_worker(threads=1).work(burst=True, logging_level="WARNING", with_scheduler=False)
        # The worker's copy of the job, loaded as runs.runner loads it.
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
