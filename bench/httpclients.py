"""How many httpx clients should a threaded worker share? Measured against the simulator.

    .venv/bin/python bench/httpclients.py [--threads 100] [--latency-ms 1000] [--seconds 10]

Each of `--threads` threads posts chat completions in a loop for `--seconds`, sharing either one
httpx.Client (one connection pool, as many connections as threads) or a few clients picked
round-robin. Ideal throughput is threads / latency. encode/httpx#3215: one pool is CPU-bound at
high concurrency; this shows whether that holds for the sync client under threads.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, print_table  # noqa: E402


def run(url: str, clients: int, threads: int, seconds: float) -> tuple[float, float, int]:
    per_client = max(1, -(-threads // clients))
    pool = [
        httpx.Client(
            timeout=30,
            limits=httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client),
        )
        for _ in range(clients)
    ]
    picker = itertools.cycle(pool)
    lock = threading.Lock()
    done = [0]
    errors = [0]
    stop_at = time.monotonic() + seconds
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hello"}]}

    def loop() -> None:
        while time.monotonic() < stop_at:
            with lock:
                client = next(picker)
            try:
                client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
            except httpx.HTTPError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                done[0] += 1

    cpu0 = time.process_time()
    started = time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu0
    for c in pool:
        c.close()
    return done[0] / elapsed, cpu / elapsed, errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--latency-ms", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", default="1,4,10")
    options = parser.parse_args()
    ideal = options.threads / (options.latency_ms / 1000)
    rows = []
    with Stack(sim_latency_ms=options.latency_ms, migrate=False) as stack:
        for clients in [int(c) for c in options.clients.split(",")]:
            rate, cpu, errors = run(stack.simulator_url, clients, options.threads, options.seconds)
            rows.append(
                [clients, f"{rate:.1f}", f"{100 * rate / ideal:.0f}%", f"{cpu:.2f}", errors]
            )
    print_table(
        ["httpx clients", "req/s", "% of ideal", "client CPU (cores)", "errors"],
        rows,
        title=f"{options.threads} threads, simulator at {options.latency_ms} ms, ideal {ideal:.0f}"
        " req/s",
    )


if __name__ == "__main__":
    main()
