"""What the dashboard page shows: the context for its full render and for each live region.

The page (templates/jobs/dashboard.html) has three live regions:

- ``job-counters`` (viewers without the health panel): jobs by status, pushed over the
  websocket by jobs.live on every job change (issue #5's mechanism) and re-fetched when the
  socket (re)connects;
- ``dashboard-live``: the workload health panel (operators only), the jobs by status included,
  every figure from one `stats.snapshot` so that no two disagree. It is heavier (a few dozen
  aggregate queries), so it is not pushed from workers on every change: the page re-fetches it
  when a websocket update arrives (throttled to one fetch per 2 s per viewer) and every 5 s
  regardless, so breaker and capacity changes that move no job still show up;
- ``recent-jobs``: the viewer's ten newest jobs, one query, re-fetched like the health panel
  (every 10 s rather than 5), so a job submitted elsewhere appears and statuses move.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import HttpRequest

from aiqueue import supervision
from jobs import operator
from jobs.access import visible_jobs
from jobs.live import listed_jobs, status_counts
from jobs.models import Job, Workload
from ops import charts, stats

PARTS = ("job-counters", "dashboard-live", "recent-jobs")
SPANS = {"hour": "Last hour", "day": "Last day"}


def can_view_health(user) -> bool:
    return user.has_perm("jobs.view_job")


def permissions(user) -> dict[str, bool]:
    """Which operator controls the user may use (each view checks again)."""
    return {
        "workloads": user.has_perm("jobs.change_workload"),
        "jobs": user.has_perm("jobs.change_job"),
        "providers": user.has_perm("jobs.change_provider"),
        "budgets": user.has_perm("jobs.change_budget"),
    }


def requested_part(request: HttpRequest) -> str | None:
    """The live region an htmx request re-fetches (by its target id), None for the full page."""
    if not request.htmx or request.htmx.boosted:
        return None
    target = request.htmx.target or ""
    return target if target in PARTS else "job-counters"


def requested_span(request: HttpRequest) -> str:
    span = request.GET.get("span", "hour")
    return span if span in SPANS else "hour"


def context(request: HttpRequest, part: str | None = None) -> dict[str, Any]:

    user = request.user
    data: dict[str, Any] = {"show_health": can_view_health(user)}
    if part == "dashboard-live" and not data["show_health"]:
        raise PermissionDenied("The health panel is for operators.")
    if part in (None, "job-counters") and not data["show_health"]:
        # Operators read the counts in the health panel, from the same snapshot as its other
        # figures (two sources at two instants disagreed mid-burst).
        jobs = listed_jobs(visible_jobs(user))
        counts = dict(jobs.order_by().values_list("status").annotate(n=Count("id")))
        data["counts"] = status_counts(counts)
    if part in (None, "recent-jobs"):
        data["recent"] = listed_jobs(visible_jobs(user))[:10]
    if part is None:
        data["workloads"] = Workload.objects.select_related("provider")
    if part in (None, "dashboard-live") and data["show_health"]:
        data.update(health_context(request))
    return data


_snapshots: dict[str, tuple[float, stats.Snapshot]] = {}
_snapshot_lock = threading.Lock()


def recent_snapshot(span: str) -> stats.Snapshot:
    """`stats.snapshot` for `span`, at most AIQUEUE_DASHBOARD_CACHE_SECONDS old. Every
    operator's page, its 5 s refresh and its websocket-triggered re-fetches share one
    computation per process, so the dashboard's cost does not grow with its viewers (nor
    with a burst, which triggers re-fetches). One computation at a time: threads that waited
    for it take its result."""
    ttl = settings.AIQUEUE_DASHBOARD_CACHE_SECONDS
    if ttl <= 0:
        return stats.snapshot(spans=[span])
    cached = _snapshots.get(span)
    if cached is not None and time.monotonic() - cached[0] < ttl:
        return cached[1]
    with _snapshot_lock:
        cached = _snapshots.get(span)
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        snap = stats.snapshot(spans=[span])
        _snapshots[span] = (time.monotonic(), snap)
        return snap


def forget_snapshots() -> None:
    """After an operator's action: the next page shows its effect at once."""
    _snapshots.clear()


def health_context(request: HttpRequest) -> dict[str, Any]:
    span = requested_span(request)
    split = requested_split(request)
    snap = recent_snapshot(span)
    can = permissions(request.user)
    series = snap.series[span]
    trend_charts = build_charts(series, split)
    return {
        "snap": snap,
        "span": span,
        "spans": list(SPANS.items()),
        "split": split,
        "splits": list(charts.SPLITS.items()),
        "charts": trend_charts,
        "chart_data": charts.payload(series.starts, trend_charts),
        "can": can,
        "simulator": operator.simulator_state() if can["providers"] else None,
        "actions": operator.recent_actions(),
        # ./run's processes as its supervisor last saw them (None when not under ./run).
        "processes": supervision.read_status(settings.VAR_DIR),
        "held_total": snap.overall.held,
        # Shown as tiles, with their details; every other status as a counter above them.
        "tile_statuses": [
            Job.Status.QUEUED,
            Job.Status.WAITING,
            Job.Status.HELD,
            Job.Status.RUNNING,
        ],
        "job_statuses": Job.Status,
    }


def requested_split(request: HttpRequest) -> str:
    split = request.GET.get("split", "total")
    return split if split in charts.SPLITS else "total"


# Per split: (chart key, title, unit, the Series.by_<split> entry it plots).
SPLIT_CHARTS = {
    "workload": [
        ("throughput", "Jobs finished", "/min", "throughput"),
        ("latency", "Run time p95", " s", "run_time_p95"),
        ("spend", "Spend", "$", "spend"),
    ],
    "provider": [
        ("throughput", "Provider calls", "/min", "calls"),
        ("latency", "Call time p95", " s", "call_time_p95"),
        ("spend", "Spend", "$", "spend"),
    ],
}


def build_charts(series: stats.Series, split: str = "total") -> list[charts.Chart]:
    """The four trend charts, one line per total, per workload or per provider."""
    if split in SPLIT_CHARTS:
        by = series.by_workload if split == "workload" else series.by_provider
        return [
            *(
                charts.line_chart(key, title, unit, by[entry].items())
                for key, title, unit, entry in SPLIT_CHARTS[split]
            ),
            _depth_chart(series, note=f"all {split}s: depth is not split"),
        ]
    return [
        charts.line_chart(
            "throughput", "Throughput", "/min", [("jobs finished", series.throughput)]
        ),
        charts.line_chart(
            "latency",
            "Latency p95",
            " s",
            [("queue wait", series.queue_wait_p95), ("run time", series.run_time_p95)],
        ),
        charts.line_chart("spend", "Spend", "$", [("USD per bucket", series.spend)]),
        _depth_chart(series),
    ]


def _depth_chart(series: stats.Series, note: str = "") -> charts.Chart:
    return charts.line_chart(
        "depth",
        "Queue depth",
        "",
        [("queued", series.queued), ("waiting + held", series.backlog)],
        note=note,
    )
