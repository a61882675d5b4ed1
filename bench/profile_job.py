"""profile_job: where one job's time goes, with the zero-latency simulator.

    .venv/bin/python bench/profile_job.py [--jobs 200] [--top 40] [--plain [--threads N]]

Submits N jobs, then runs them in THIS process with the one-job-at-a-time Worker (burst)
under cProfile, counting SQL queries and Redis commands. Prints per-job counts, wall and CPU
time per job, and the functions with the most cumulative time. --plain: no profiler;
--threads N (with --plain): the worker with N pool threads instead (SQL is counted
with one thread only: the wrapper is per connection). Not a scenario with a target: a tool
for finding what to cut in the per-job path (see the dispatch scenario).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack  # noqa: E402


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        rest = filename.split("site-packages/", 1)[1].split("/")
        return "/".join(rest[:3]) if rest[0] == "django" else rest[0]
    if "/work/" in filename or filename.startswith(str(Path(__file__).resolve().parent.parent)):
        parts = Path(filename).parts
        return "/".join(parts[-2:]) if "jobs" in parts or "review" in parts else parts[-1]
    return "stdlib/builtins"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="cumulative")
    parser.add_argument("--plain", action="store_true", help="time without the profiler")
    parser.add_argument("--threads", type=int, default=1, help="with --plain only")
    parser.add_argument("--sql", type=int, default=0, help="list statements (first N chars)")
    options = parser.parse_args()
    if options.threads > 1 and not options.plain:
        parser.error("--threads needs --plain (cProfile sees one thread)")

    with Stack(sim_latency_ms=0) as stack:
        stack.django()
        workload = stack.make_workload("Bench profile", max_output_tokens=20)
        pks = stack.submit_jobs(workload, options.jobs)

        import redis
        from django.db import connection

        from runs.worker import build_worker

        sql: Counter[str] = Counter()
        statements: Counter[str] = Counter()
        commands: Counter[str] = Counter()

        def count_sql(execute, sql_text, params, many, context):
            sql[sql_text.split(" ", 1)[0].upper()] += 1
            if options.sql:
                statements[re.sub(r"\s+", " ", sql_text)[: options.sql]] += 1
            return execute(sql_text, params, many, context)

        original = redis.Redis.execute_command

        def count_redis(self, *args, **kwargs):
            commands[str(args[0]).upper()] += 1
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent["Redis"] += time.perf_counter() - started

        original_pipe = redis.client.Pipeline.execute

        def count_pipe(self, *args, **kwargs):
            commands["(pipeline)"] += 1
            started = time.perf_counter()
            try:
                return original_pipe(self, *args, **kwargs)
            finally:
                spent["Redis"] += time.perf_counter() - started

        # Wall time inside the ORM (compile + execute), Redis calls and the provider's HTTP.
        spent: Counter[str] = Counter()

        def timed(label, fn):
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[label] += time.perf_counter() - started

            return wrapper

        import httpx
        from django.db.models.sql import compiler
        from django.template import base as template_base

        patches = [
            (compiler.SQLCompiler, "execute_sql", "ORM"),
            (compiler.SQLInsertCompiler, "execute_sql", "ORM"),
            (httpx.Client, "send", "HTTP (provider)"),
            (template_base.Template, "render", "templates"),
        ]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, label in patches:
            setattr(owner, name, timed(label, getattr(owner, name)))
        # One thread: the jobs run on this one, where cProfile sees them.
        worker = build_worker(threads=options.threads, inline=options.threads == 1)
        profiler = cProfile.Profile()
        redis.Redis.execute_command = count_redis
        redis.client.Pipeline.execute = count_pipe
        started, cpu_started = time.monotonic(), time.process_time()
        with connection.execute_wrapper(count_sql):
            if not options.plain:
                profiler.enable()
            worker.work(burst=True, logging_level="WARNING", with_scheduler=False)
            if not options.plain:
                profiler.disable()
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
        redis.Redis.execute_command = original
        redis.client.Pipeline.execute = original_pipe
        for owner, name, fn in saved:
            setattr(owner, name, fn)

        done = stack.count_status(pks, "succeeded")
        n = options.jobs
        how = "without the profiler" if options.plain else "under the profiler"
        print(
            f"{done}/{n} succeeded in {elapsed:.2f} s {how}, {options.threads} thread(s): "
            f"{elapsed / n * 1000:.1f} ms/job wall, {cpu / n * 1000:.1f} ms/job CPU "
            f"({n / elapsed:.1f} jobs/s)"
        )
        if options.threads == 1:
            print(
                "SQL per job:",
                {k: round(v / n, 2) for k, v in sql.most_common()},
                f"total {sum(sql.values()) / n:.1f}",
            )
        print(
            "Redis per job:",
            {k: round(v / n, 2) for k, v in commands.most_common()},
            f"total {sum(commands.values()) / n:.1f}",
        )
        print(
            "ms per job in:",
            {k: round(v / n * 1000, 2) for k, v in spent.most_common()},
            "(ORM includes the SQL it runs; sections overlap where one calls another)",
        )
        for text, count in statements.most_common():
            print(f"{count / n:5.2f}  {text}")
        if options.plain:
            return
        stats = pstats.Stats(profiler)
        by_package: Counter[str] = Counter()
        for (filename, _line, _name), row in stats.stats.items():  # type: ignore[attr-defined]
            by_package[_package(filename)] += row[2]  # tottime
        total = sum(by_package.values())
        print(
            "own time by package (% of profiled time):",
            {k: f"{v / total:.0%}" for k, v in by_package.most_common(14)},
        )
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(options.sort).print_stats(options.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
