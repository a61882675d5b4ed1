"""spike: a burst of submissions while people use the site, queue vs synchronous calls.

    .venv/bin/python bench/spike.py [--submissions 1000] [--latency-ms 2000] [--senders 100]
                                    [--timeout 10] [--quick]

The simulator answers after --latency-ms. --senders client threads send --submissions POSTs as
fast as they can, while a logged-in probe GETs the dashboard every 100 ms. Same ASGI server
(uvicorn, 1 process), same machine, two apps:

- aiqueue: POST /api/jobs (row + enqueue, answer 202); one `manage.py worker` runs the jobs;
- sync baseline: POST /bench/sync-submit, a bench-only view (bench/sync_baseline.py, mounted
  by bench.sync_baseline_settings) that calls the provider inside the request;
- the same baseline as people deploy Django (issue #22's T4): gunicorn, gthread workers,
  2 processes x 4 threads, serving bench/sync_baseline_wsgi.py; eight requests in flight at
  most, each holding its thread for the provider's answer;
- the same baseline through uvicorn's WSGI interface (its fixed pool of 10 threads): a
  reference row, as is the ASGI one above, because Django's ASGI handler gives every sync
  request a thread of its own, so it does not run out of threads (the earlier issue's
  baseline).

Printed per side: accept latency p50/p99 (submission answered), probe p50/p99, errors and
timeouts (--timeout s per request; a probe that timed out counts in the percentiles as
--timeout, a lower bound, marked ">="), and provider calls made while the burst lasted.
--quick: 200 submissions, 40 senders.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, percentile, print_table  # noqa: E402


def burst(stack: Stack, base: str, path: str, key: str, workload: str, options) -> dict[str, float]:
    n, senders, timeout = options.submissions, options.senders, options.timeout
    accept: list[float] = []
    probe: list[float] = []
    failures = {"errors": 0, "timeouts": 0, "probe_errors": 0, "probe_timeouts": 0}
    lock = threading.Lock()
    counter = iter(range(n))
    burst_over = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=base, timeout=timeout) as client:
            while (i := next(counter, None)) is not None:
                started = time.monotonic()
                try:
                    response = client.post(
                        path,
                        json={"workload": workload, "input": f"spike text {i}"},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    ok = response.status_code in (200, 202)
                except httpx.TimeoutException:
                    with lock:
                        failures["timeouts"] += 1
                    continue
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        accept.append(time.monotonic() - started)
                    else:
                        failures["errors"] += 1

    def watch() -> None:
        client = stack.login_client(base, timeout=timeout)
        while not burst_over.is_set():
            started = time.monotonic()
            try:
                response = client.get("/")
                if response.status_code == 200:
                    probe.append(time.monotonic() - started)
                else:
                    failures["probe_errors"] += 1
            except httpx.TimeoutException:
                # Counted at the timeout: a lower bound, so a starved probe still shows.
                probe.append(timeout)
                failures["probe_timeouts"] += 1
            except httpx.HTTPError:
                failures["probe_errors"] += 1
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
        client.close()

    stack.sim_reset_counters()
    prober = threading.Thread(target=watch)
    prober.start()
    time.sleep(1.0)  # a few quiet probes first
    started = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.monotonic() - started
    time.sleep(1.0)
    burst_over.set()
    prober.join()
    return {
        "accept_p50": percentile(accept, 50) * 1000,
        "accept_p99": percentile(accept, 99) * 1000,
        "probe_p50": percentile(probe, 50) * 1000,
        "probe_p99": percentile(probe, 99) * 1000,
        "probes": len(probe),
        "accepted": len(accept),
        "duration": duration,
        "calls": stack.sim_counters()["requests_total"],
        **failures,
    }


def _ms(value: float, side: dict, timeout: float) -> str:
    """A percentile in ms, as ">=N" when it is a timed-out probe's lower bound."""
    lower_bound = side["probe_timeouts"] and value >= timeout * 1000
    return f"{'>=' if lower_bound else ''}{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--latency-ms", type=int, default=2000)
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.quick:
        options.submissions, options.senders = 200, 40

    with Stack(sim_latency_ms=options.latency_ms) as stack:
        stack.django()
        workload = stack.make_workload("Bench spike", max_output_tokens=40)
        key = stack.api_token()
        stack.user()

        web = stack.start_web(workers=1)
        stack.start_workers(1, args=["--no-scheduler"])
        queued = burst(stack, web, "/api/jobs", key, workload.name, options)
        # Stop aiqueue's web and worker: the baseline gets the machine to itself.
        for process in stack.processes[-2:]:
            stack.stop_process(process, grace=5)

        settings_module = "bench.sync_baseline_settings"
        sync_web = stack.start_web(workers=1, settings_module=settings_module)
        sync = burst(stack, sync_web, "/bench/sync-submit", key, workload.name, options)
        stack.stop_process(stack.processes[-1], grace=5)

        wsgi_web = stack.start_web(
            workers=1,
            settings_module=settings_module,
            app="bench.sync_baseline_wsgi:application",
            interface="wsgi",
        )
        wsgi = burst(stack, wsgi_web, "/bench/sync-submit", key, workload.name, options)
        stack.stop_process(stack.processes[-1], grace=5)

        gunicorn_web = stack.start_gunicorn(
            "bench.sync_baseline_wsgi:application", workers=2, threads=4,
            settings_module=settings_module,
        )  # fmt: skip
        gthread = burst(stack, gunicorn_web, "/bench/sync-submit", key, workload.name, options)

    timeout = options.timeout
    rows = []
    sides = (
        ("aiqueue (queue)", queued),
        ("sync baseline: gunicorn gthread 2 x 4", gthread),
        ("reference: sync, Django's ASGI handler", sync),
        ("reference: sync, uvicorn WSGI 10 threads", wsgi),
    )
    for name, r in sides:
        rows.append(
            [
                name,
                f"{r['accepted']}/{options.submissions}",
                f"{r['accept_p50']:.0f} / {r['accept_p99']:.0f}",
                f"{_ms(r['probe_p50'], r, timeout)} / {_ms(r['probe_p99'], r, timeout)}",
                f"{r['errors']} / {r['timeouts']}",
                f"{r['probe_errors']} / {r['probe_timeouts']}",
                r["calls"],
                f"{r['duration']:.1f}",
            ]
        )
    print_table(
        ["app", "accepted", "accept p50/p99 ms", "probe p50/p99 ms", "errors/timeouts",
         "probe err/timeouts", "provider calls", "burst s"],
        rows,
        title=f"spike: {options.submissions} submissions from {options.senders} senders, "
        f"simulator {options.latency_ms} ms, timeout {options.timeout} s",
    )  # fmt: skip

    def ratio(side: dict) -> float:
        return side["probe_p99"] / queued["probe_p99"] if queued["probe_p99"] else float("nan")

    print(
        f"probe p99: gunicorn gthread baseline / aiqueue = {ratio(gthread):.1f}x (target >= 20x;"
        f" '>=' in the table: probes timed out, counted at the timeout, so a lower bound); "
        f"references: ASGI / aiqueue {ratio(sync):.1f}x, uvicorn WSGI / aiqueue "
        f"{ratio(wsgi):.1f}x."
    )


if __name__ == "__main__":
    main()
