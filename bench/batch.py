"""Batch (issue #9): a 10,000-row CSV batch through the web UI, simulator at 500 ms latency.

    .venv/bin/python bench/batch.py            # 10,000 rows, waves of 100 and of 400
    .venv/bin/python bench/batch.py --quick    # 1,000 rows
    options: --rows N --waves 100,400 --latency-ms L --workers W --threads T --keep

For each wave size (the batch's max_in_flight) it starts a fresh stack (Redis on a free port,
the simulator, a fresh SQLite DB, uvicorn, W worker processes x T threads), logs in, uploads
the CSV to /batches/new/ (parse + store every row as pending), starts the batch, and follows it
until every row has settled. It reports:

- upload time (POST of the file → the preview page is ready) and rows/s of the run
  (start → last row settled);
- the most RQ queue entries seen at once (waves: should stay near the wave size, not N);
- peak memory of the web and worker processes: RSS and PSS (whole process trees, sampled
  every second), and Redis' own `used_memory_peak`;
- time to download the results CSV (streamed) and its size.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import redis  # noqa: E402

from bench.common import Stack, print_table, pss_kib  # noqa: E402


def rss_kib(pid: int) -> int:
    """RSS of a process and its descendants (KiB); counts shared pages once per process."""
    from bench.common import _children

    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
        pending += _children(current)
    return total


def make_csv(rows: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["product", "review"])
    for i in range(rows):
        writer.writerow([f"Product {i % 97}", f"Review {i}: works well, ships fast,\nwould buy."])
    return buffer.getvalue().encode()


def run_once(args, wave: int) -> dict:
    with Stack(sim_latency_ms=args.latency_ms, keep=args.keep) as stack:
        stack.django()
        from batches.models import Batch
        from batches.services import progress

        stack.make_workload(
            "Bench sentiment",
            kind="classify",
            prompt_template="Product: {product}\nReview: {review}",
            labels=["positive", "neutral", "negative"],
            system_prompt="Classify the review.",
            max_output_tokens=5,
        )
        web_url = stack.start_web(workers=1)
        web = stack.processes[-1]
        workers = stack.start_workers(args.workers, threads=args.threads)
        client = stack.login_client(web_url, timeout=300)
        csrf = client.cookies.get("csrftoken", "")
        headers = {"X-CSRFToken": csrf, "Referer": web_url + "/batches/new/"}
        from jobs.models import Workload

        workload = Workload.objects.get(name="Bench sentiment")

        started = time.monotonic()
        response = client.post(
            "/batches/new/",
            data={"workload": str(workload.pk), "priority": "low"},
            files={"file": ("reviews.csv", make_csv(args.rows), "text/csv")},
            headers=headers,
        )
        assert response.status_code == 302, response.text[:2000]
        location = response.headers["location"]
        client.get(location).raise_for_status()
        upload_s = time.monotonic() - started
        batch = Batch.objects.get()
        Batch.objects.filter(pk=batch.pk).update(max_in_flight=wave)

        conn = redis.Redis.from_url(stack.redis_url)
        peak = {"queued": 0, "web_rss": 0, "web_pss": 0, "worker_rss": 0, "worker_pss": 0}

        def sample() -> None:
            queued = sum(conn.llen(f"rq:queue:{q}") for q in ("high", "default", "low"))
            peak["queued"] = max(peak["queued"], queued)
            peak["web_rss"] = max(peak["web_rss"], rss_kib(web.pid))
            peak["web_pss"] = max(peak["web_pss"], pss_kib(web.pid))
            peak["worker_rss"] = max(peak["worker_rss"], sum(rss_kib(w.pid) for w in workers))
            peak["worker_pss"] = max(peak["worker_pss"], sum(pss_kib(w.pid) for w in workers))

        run_start = time.monotonic()
        response = client.post(f"/batches/{batch.code}/start/", headers=headers)
        assert response.status_code == 302, response.status_code
        start_request_s = time.monotonic() - run_start

        def finished() -> bool:
            sample()
            batch.refresh_from_db()
            return batch.status == Batch.Status.COMPLETED

        stack.wait_until(finished, timeout=args.timeout, interval=1.0)
        run_s = time.monotonic() - run_start
        final = progress(batch)

        download_start = time.monotonic()
        size = 0
        with client.stream("GET", f"/batches/{batch.code}/results.csv") as stream:
            for chunk in stream.iter_bytes():
                size += len(chunk)
        download_s = time.monotonic() - download_start
        sample()
        info = conn.info("memory")
        return {
            "wave": wave,
            "rows": args.rows,
            "done": final.done,
            "upload_s": upload_s,
            "run_s": run_s,
            "start_request_s": start_request_s,
            "rows_per_s": final.settled / run_s,
            "peak_queued": peak["queued"],
            "web_rss_mib": peak["web_rss"] / 1024,
            "web_pss_mib": peak["web_pss"] / 1024,
            "worker_rss_mib": peak["worker_rss"] / 1024,
            "worker_pss_mib": peak["worker_pss"] / 1024,
            "redis_peak_mib": info["used_memory_peak"] / 1_048_576,
            "download_s": download_s,
            "csv_mib": size / 1_048_576,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 rows")
    parser.add_argument("--waves", default="100,400", help="max_in_flight values to compare")
    parser.add_argument("--latency-ms", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows = 1000
    if args.single:
        print("RESULT " + json.dumps(run_once(args, args.single)))
        return
    # Each wave size in its own process: Django binds its settings (the stack's database) once
    # per process, and each run gets a fresh stack.
    results = []
    for wave in args.waves.split(","):
        argv = [sys.executable, __file__, "--single", wave, "--rows", str(args.rows),
                "--latency-ms", str(args.latency_ms), "--workers", str(args.workers),
                "--threads", str(args.threads), "--timeout", str(args.timeout),
                *(["--keep"] if args.keep else [])]  # fmt: skip
        output = subprocess.run(argv, capture_output=True, text=True, check=False)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            sys.exit(f"wave {wave} failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}")
        results.append(json.loads(lines[-1][7:]))

    def pair(a: str, b: str, fmt: str = ".0f") -> list[str]:
        return [f"{r[a]:{fmt}} / {r[b]:{fmt}}" for r in results]

    print_table(
        ["metric", *(f"wave {r['wave']}" for r in results)],
        [
            ["rows (succeeded)", *(f"{r['rows']:,} ({r['done']:,})" for r in results)],
            ["upload + preview (s)", *(r["upload_s"] for r in results)],
            ["start request: first wave queued (s)", *(r["start_request_s"] for r in results)],
            ["run: start → last row (s)", *(r["run_s"] for r in results)],
            ["rows/s", *(r["rows_per_s"] for r in results)],
            ["most RQ entries at once", *(r["peak_queued"] for r in results)],
            ["web peak RSS / PSS (MiB)", *pair("web_rss_mib", "web_pss_mib")],
            ["workers peak RSS / PSS (MiB)", *pair("worker_rss_mib", "worker_pss_mib")],
            ["Redis used_memory_peak (MiB)", *(r["redis_peak_mib"] for r in results)],
            ["results CSV download (s / MiB)", *pair("download_s", "csv_mib", ".2f")],
        ],
        title=f"batch: {args.rows:,} rows, simulator {args.latency_ms} ms, "
        f"{args.workers} workers x {args.threads} threads",
    )


if __name__ == "__main__":
    main()
