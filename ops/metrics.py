"""``/metrics`` in the Prometheus text format.

A custom collector computes every value at scrape time from the database (the ledger and the
job table) and from Redis (queue lengths, breakers, leases), into a registry of its own. Nothing
is counted in process memory, so any web process answers with the same figures and a restart
resets nothing. Counters (attempts, spend, histograms) are cumulative sums over the ledger,
which is append-only, so they only ever grow as Prometheus expects.

Access: staff users (session), or ``Authorization: Bearer <AIQUEUE_METRICS_TOKEN>`` when that
setting is set.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Iterator

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from jobs import queueing
from jobs.models import Attempt, Job, Priority
from ops import stats

log = logging.getLogger(__name__)

# Seconds. Provider calls take ~0.1-60 s; jobs wait in queues up to minutes or hours.
LATENCY_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
WAIT_BUCKETS = [0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600]
BREAKER_STATES = ["closed", "open", "half_open", "unknown"]


def _histogram(
    name: str,
    documentation: str,
    queryset,
    value_expr,
    buckets: list[float],
    to_seconds,
    sum_seconds,
    label_field: str,
    label_name: str,
) -> HistogramMetricFamily:
    """A cumulative histogram computed by one grouped SQL query with one conditional count per
    bucket (portable between SQLite and PostgreSQL)."""
    family = HistogramMetricFamily(name, documentation, labels=[label_name])
    aggregates = {
        f"le_{i}": Count("id", filter=Q(_v__lte=to_seconds(bound)))
        for i, bound in enumerate(buckets)
    }
    rows = (
        queryset.annotate(_v=value_expr)
        .filter(_v__isnull=False)
        .order_by()
        .values(label_field)
        .annotate(_n=Count("id"), _sum=Sum("_v"), **aggregates)
    )
    for row in rows:
        counts = [(floatToGoString(b), row[f"le_{i}"]) for i, b in enumerate(buckets)]
        counts.append(("+Inf", row["_n"]))
        family.add_metric([str(row[label_field])], counts, sum_seconds(row["_sum"]))
    return family


class AiqueueCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self.job_metrics()
        yield from self.attempt_metrics()
        yield from self.provider_metrics()
        yield from self.queue_metrics()
        yield from self.review_and_budget_metrics()

    def job_metrics(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "aiqueue_jobs", "Jobs by current status and workload.", labels=["workload", "status"]
        )
        counts = {
            (workload, status): n
            for workload, status, n in Job.objects.order_by()
            .values_list("workload__name", "status")
            .annotate(n=Count("id"))
        }
        workloads = sorted({w for w, _ in counts})
        for workload in workloads:
            for status in Job.Status.values:
                by_status.add_metric([workload, status], counts.get((workload, status), 0))
        yield by_status

        overall, per_workload = stats.workload_figures()
        queued = GaugeMetricFamily(
            "aiqueue_queue_depth",
            "Queued jobs (admitted, not started) by workload and priority.",
            labels=["workload", "priority"],
        )
        waiting = GaugeMetricFamily(
            "aiqueue_waiting_jobs",
            "Waiting jobs by workload and reason (capacity, rate_limit, breaker, other).",
            labels=["workload", "reason"],
        )
        held = GaugeMetricFamily(
            "aiqueue_held_jobs", "Jobs held by an exhausted budget.", labels=["workload"]
        )
        for fig in per_workload:
            name = fig.workload.name
            for priority in Priority.values:
                queued.add_metric([name, priority], fig.queued_by_priority.get(priority, 0))
            for reason, _label in stats.WAIT_REASONS:
                waiting.add_metric([name, reason], fig.waiting_by_reason[reason])
            held.add_metric([name], fig.held)
        yield queued
        yield waiting
        yield held

        finished = Job.objects.filter(started_at__isnull=False, finished_at__isnull=False)
        yield _histogram(
            "aiqueue_job_run_seconds",
            "Run time of finished jobs (finished_at - started_at).",
            finished,
            ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField()),
            LATENCY_BUCKETS,
            _duration,
            _seconds_of,
            "workload__name",
            "workload",
        )
        started = Job.objects.filter(started_at__isnull=False)
        yield _histogram(
            "aiqueue_job_queue_wait_seconds",
            "Time from (re)queueing to the start of the latest run.",
            started,
            ExpressionWrapper(
                F("started_at") - Coalesce("queued_at", "created_at"),
                output_field=DurationField(),
            ),
            WAIT_BUCKETS,
            _duration,
            _seconds_of,
            "workload__name",
            "workload",
        )

    def attempt_metrics(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "aiqueue_attempts",
            "Provider calls by provider and outcome (ok, or the error class).",
            labels=["provider", "outcome"],
        )
        for provider, error_class, n in (
            Attempt.objects.order_by()
            .values_list("provider__name", "error_class")
            .annotate(n=Count("id"))
        ):
            attempts.add_metric([provider, error_class or "ok"], n)
        yield attempts

        spend = CounterMetricFamily(
            "aiqueue_spend_usd",
            "Money spent on provider calls, failed calls included (the ledger's sum).",
            labels=["provider"],
        )
        for provider, total in (
            Attempt.objects.order_by().values_list("provider__name").annotate(s=Sum("cost"))
        ):
            spend.add_metric([provider], float(total or 0))
        yield spend

        yield _histogram(
            "aiqueue_attempt_latency_seconds",
            "Latency of provider calls.",
            Attempt.objects.all(),
            F("latency_ms"),
            LATENCY_BUCKETS,
            lambda seconds: seconds * 1000,
            lambda total_ms: (total_ms or 0) / 1000,
            "provider__name",
            "provider",
        )

    def provider_metrics(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "aiqueue_provider_in_flight", "In-flight calls per provider.", labels=["provider"]
        )
        cap = GaugeMetricFamily(
            "aiqueue_provider_concurrency_cap",
            "Configured maximum in-flight calls per provider (absent: no cap).",
            labels=["provider"],
        )
        breaker = GaugeMetricFamily(
            "aiqueue_breaker_state",
            "Circuit breaker state per provider: 1 for the current state, 0 for the others.",
            labels=["provider", "state"],
        )
        for state in stats.provider_states():
            name = state.provider.name
            in_flight.add_metric([name], state.in_flight)
            if state.cap is not None:
                cap.add_metric([name], state.cap)
            for value in BREAKER_STATES:
                breaker.add_metric([name, value], 1 if state.breaker == value else 0)
        yield in_flight
        yield cap
        yield breaker

    def queue_metrics(self) -> Iterator[Metric]:
        length = GaugeMetricFamily(
            "aiqueue_rq_queue_length", "Entries in each RQ queue in Redis.", labels=["queue"]
        )
        try:
            for name in settings.RQ_QUEUE_NAMES:
                length.add_metric([name], queueing.queue(name).count)
        except Exception:  # noqa: BLE001 - Redis down: the rest of the scrape still works
            log.warning("metrics: RQ queue lengths unavailable", exc_info=True)
            return
        yield length

    def review_and_budget_metrics(self) -> Iterator[Metric]:
        backlog = stats.review_backlog()
        open_items = GaugeMetricFamily("aiqueue_review_open", "Open review items.")
        open_items.add_metric([], sum(n for _w, n, _oldest in backlog))
        yield open_items
        budgets = stats.budget_rows()
        if not budgets:
            return
        spent = GaugeMetricFamily(
            "aiqueue_budget_spent_usd", "Spent in the budget's period.", labels=["budget"]
        )
        reserved = GaugeMetricFamily(
            "aiqueue_budget_reserved_usd", "Reserved by admitted jobs.", labels=["budget"]
        )
        capped = GaugeMetricFamily("aiqueue_budget_cap_usd", "Budget cap.", labels=["budget"])
        for budget in budgets:
            spent.add_metric([budget.name], float(budget.spent_usd))
            reserved.add_metric([budget.name], float(budget.reserved_usd))
            capped.add_metric([budget.name], float(budget.cap_usd))
        yield spent
        yield reserved
        yield capped


def _duration(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)


def _seconds_of(total: dt.timedelta | None) -> float:
    return total.total_seconds() if total is not None else 0.0


def registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AiqueueCollector())
    return registry


def is_authorized(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        return True
    token = settings.AIQUEUE_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())
    return False


@login_not_required
@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not is_authorized(request):
        if request.user.is_authenticated and "Authorization" not in request.headers:
            return HttpResponse("Staff only.\n", status=403, content_type="text/plain")
        response = HttpResponse("Staff login or a metrics token is required.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="aiqueue metrics"'
        response["Content-Type"] = "text/plain; charset=utf-8"
        return response
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
