"""The dashboard's figures, computed from the database (the ledger and the audit log) and from
the live coordination state in Redis (breakers, leases). Never from process memory: every web
process shows the same numbers, and a restart loses nothing.

Every query is bounded: counts and sums are SQL aggregates; percentiles are computed in Python
over at most `SAMPLE_LIMIT` rows, sampled evenly by primary key when a window holds more.

Definitions (the tests pin each one with exact numbers):

- queued / waiting / held / running (and every other status): jobs in that status now, from
  one grouped query, a document counted once (not its chunks). Waiting jobs are split by
  what they wait for (`Job.wait_kind`, bucketed as `WAIT_BUCKETS` says).
- throughput: jobs that finished (any terminal status or needs_review, i.e. `finished_at` set)
  in the last `THROUGHPUT_WINDOW`, per minute.
- queue wait: `started_at - (queued_at or created_at)` of jobs started in the last
  `LATENCY_WINDOW`; run time: `finished_at - started_at` of jobs finished in it. p50/p95 use
  the nearest-rank method.
- error rate: failed attempts / attempts started in the last `RATE_WINDOW`; retry rate:
  attempts numbered 2 or more / attempts, same window.
- per provider, same window: calls per job (its attempts / the distinct jobs they belong
  to) and retry ratio (its attempts numbered 2 or more / its attempts); beside them the
  breaker's failure rate over its own sliding window against its threshold (Redis).
- spend: sum of Attempt.cost (failed calls included) since the start of today / this month in
  the configured time zone.
- review backlog: open ReviewItems, and the age of the oldest.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import Case, Count, F, Min, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Mod, TruncHour, TruncMinute
from django.utils import timezone

from jobs.flow import breaker, leases
from jobs.models import (
    Attempt,
    Budget,
    Job,
    JobEvent,
    Priority,
    Provider,
    Workload,
)
from review.models import ReviewItem

THROUGHPUT_WINDOW = dt.timedelta(minutes=10)
LATENCY_WINDOW = dt.timedelta(hours=1)
RATE_WINDOW = dt.timedelta(hours=1)
SAMPLE_LIMIT = 5000

# Waiting reasons shown on the dashboard, in display order.
WAIT_REASONS = [
    ("capacity", "Capacity"),
    ("rate_limit", "Rate limit"),
    ("breaker", "Breaker open"),
    ("backoff", "Retry backoff"),
    ("paused", "Workload paused"),
    ("other", "Other"),
]
# The dashboard's bucket of each Job.WaitKind a waiting job can have (the rest are "other").
WAIT_BUCKETS = {
    Job.WaitKind.CAPACITY: "capacity",
    Job.WaitKind.RATE_LIMIT: "rate_limit",
    Job.WaitKind.BREAKER: "breaker",
    Job.WaitKind.BACKOFF: "backoff",
    Job.WaitKind.RETRY_BUDGET: "backoff",
    Job.WaitKind.PAUSED: "paused",
}
# Statuses that count as "not started yet" for the queue-depth chart.
BACKLOG_STATUSES = (Job.Status.WAITING, Job.Status.HELD)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def bounded(queryset: QuerySet, limit: int = SAMPLE_LIMIT) -> QuerySet:
    """At most about `limit` rows of `queryset`, sampled evenly by primary key (portable SQL)."""
    total = queryset.count()
    if total <= limit:
        return queryset
    stride = math.ceil(total / limit)
    return queryset.annotate(_sample=Mod("pk", stride)).filter(_sample=0)


def day_start(now: dt.datetime) -> dt.datetime:
    local = timezone.localtime(now)
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: dt.datetime) -> dt.datetime:
    return day_start(now).replace(day=1)


@dataclass
class Figures:
    """The health figures of one workload, or of all of them (`workload` None)."""

    workload: Workload | None = None
    queued_by_priority: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(Priority.values, 0)
    )
    waiting_by_reason: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys([r for r, _ in WAIT_REASONS], 0)
    )
    held: int = 0
    running: int = 0
    # Jobs by status, every status (the dashboard's counters).
    counts: dict[str, int] = field(default_factory=dict)
    finished_recently: int = 0
    queue_waits: list[float] = field(default_factory=list, repr=False)
    run_times: list[float] = field(default_factory=list, repr=False)
    attempts: int = 0
    failed_attempts: int = 0
    retries: int = 0
    spend_today: Decimal = Decimal(0)
    spend_month: Decimal = Decimal(0)
    review_open: int = 0
    review_oldest_at: dt.datetime | None = None
    now: dt.datetime | None = None

    @property
    def name(self) -> str:
        return self.workload.name if self.workload else "All workloads"

    @property
    def queued(self) -> int:
        return sum(self.queued_by_priority.values())

    @property
    def waiting(self) -> int:
        return sum(self.waiting_by_reason.values())

    @property
    def queued_rows(self) -> list[tuple[str, str, int]]:
        return [(v, label, self.queued_by_priority[v]) for v, label in Priority.choices]

    @property
    def status_rows(self) -> list[tuple[str, str, int]]:
        return [(value, label, self.counts.get(value, 0)) for value, label in Job.Status.choices]

    @property
    def waiting_rows(self) -> list[tuple[str, str, int]]:
        return [(r, label, self.waiting_by_reason[r]) for r, label in WAIT_REASONS]

    @property
    def throughput_per_min(self) -> float:
        return self.finished_recently / (THROUGHPUT_WINDOW.total_seconds() / 60)

    @property
    def queue_wait_p50(self) -> float | None:
        return percentile(self.queue_waits, 50)

    @property
    def queue_wait_p95(self) -> float | None:
        return percentile(self.queue_waits, 95)

    @property
    def run_time_p50(self) -> float | None:
        return percentile(self.run_times, 50)

    @property
    def run_time_p95(self) -> float | None:
        return percentile(self.run_times, 95)

    @property
    def error_rate(self) -> float | None:
        return self.failed_attempts / self.attempts if self.attempts else None

    @property
    def retry_rate(self) -> float | None:
        return self.retries / self.attempts if self.attempts else None

    @property
    def review_oldest_age(self) -> dt.timedelta | None:
        if self.review_oldest_at is None or self.now is None:
            return None
        return self.now - self.review_oldest_at


def workload_figures(now: dt.datetime | None = None) -> tuple[Figures, list[Figures]]:
    """(overall, one per workload in name order) for the moment `now`."""
    now = now or timezone.now()
    workloads = list(Workload.objects.select_related("provider").order_by("name"))
    per: dict[int, Figures] = {w.pk: Figures(workload=w, now=now) for w in workloads}
    overall = Figures(now=now)

    def targets(workload_id: int) -> Iterable[Figures]:
        yield overall
        if workload_id in per:
            yield per[workload_id]

    # Every status figure (the counters, the tiles, the workload rows) comes from this one
    # query, so they agree with each other: counted at one instant, as the job list counts
    # (a document, not its chunks, which show as calls in the providers' figures).
    by_status = (
        Job.objects.filter(parent__isnull=True)
        .annotate(
            kind=Case(When(status=Job.Status.WAITING, then=F("wait_kind")), default=Value(""))
        )
        .order_by()
        .values_list("workload_id", "status", "priority", "kind")
        .annotate(n=Count("id"))
    )
    for workload_id, status, priority, kind, n in by_status:
        for fig in targets(workload_id):
            fig.counts[status] = fig.counts.get(status, 0) + n
            if status == Job.Status.QUEUED:
                fig.queued_by_priority[priority] = fig.queued_by_priority.get(priority, 0) + n
            elif status == Job.Status.HELD:
                fig.held += n
            elif status == Job.Status.RUNNING:
                fig.running += n
            elif status == Job.Status.WAITING:
                fig.waiting_by_reason[WAIT_BUCKETS.get(kind, "other")] += n

    finished = (
        Job.objects.filter(finished_at__gt=now - THROUGHPUT_WINDOW, finished_at__lte=now)
        .order_by()
        .values_list("workload_id")
        .annotate(n=Count("id"))
    )
    for workload_id, n in finished:
        for fig in targets(workload_id):
            fig.finished_recently += n

    started = bounded(
        Job.objects.filter(started_at__gt=now - LATENCY_WINDOW, started_at__lte=now).order_by()
    ).values_list("workload_id", "queued_at", "created_at", "started_at")
    for workload_id, queued_at, created_at, started_at in started:
        wait = (started_at - (queued_at or created_at)).total_seconds()
        for fig in targets(workload_id):
            fig.queue_waits.append(max(wait, 0.0))

    ran = bounded(
        Job.objects.filter(
            finished_at__gt=now - LATENCY_WINDOW, finished_at__lte=now, started_at__isnull=False
        ).order_by()
    ).values_list("workload_id", "started_at", "finished_at")
    for workload_id, started_at, finished_at in ran:
        for fig in targets(workload_id):
            fig.run_times.append(max((finished_at - started_at).total_seconds(), 0.0))

    attempts = (
        Attempt.objects.filter(started_at__gt=now - RATE_WINDOW, started_at__lte=now)
        .order_by()
        .values_list("job__workload_id")
        .annotate(
            total=Count("id"),
            failed=Count("id", filter=~Q(error_class="")),
            retries=Count("id", filter=Q(number__gt=1)),
        )
    )
    for workload_id, total, failed, retries in attempts:
        for fig in targets(workload_id):
            fig.attempts += total
            fig.failed_attempts += failed
            fig.retries += retries

    today = day_start(now)
    spend = (
        Attempt.objects.filter(started_at__gte=month_start(now), started_at__lte=now)
        .order_by()
        .values_list("job__workload_id")
        .annotate(month=Sum("cost"), today=Sum("cost", filter=Q(started_at__gte=today)))
    )
    for workload_id, month, today_sum in spend:
        for fig in targets(workload_id):
            fig.spend_month += month or 0
            fig.spend_today += today_sum or 0

    for workload_id, n, oldest in review_backlog():
        for fig in targets(workload_id):
            fig.review_open += n
            if oldest and (fig.review_oldest_at is None or oldest < fig.review_oldest_at):
                fig.review_oldest_at = oldest

    return overall, [per[w.pk] for w in workloads]


def review_backlog() -> list[tuple[int, int, dt.datetime | None]]:
    """(workload id, open items, oldest created_at) per workload with open review items."""
    return list(
        ReviewItem.objects.filter(status=ReviewItem.Status.OPEN)
        .order_by()
        .values_list("job__workload_id")
        .annotate(n=Count("id"), oldest=Min("created_at"))
    )


# --- Providers: in-flight calls and breakers (live state in Redis) ------------------------------


@dataclass
class ProviderState:
    provider: Provider
    in_flight: int
    cap: int | None
    breaker: str  # "closed" | "open" | "half_open" | "unknown"
    breaker_detail: dict[str, Any] = field(default_factory=dict)
    in_flight_source: str = "leases"
    # Its calls in the last RATE_WINDOW, the jobs they were made for, and the retries.
    calls: int = 0
    jobs: int = 0
    retries: int = 0

    @property
    def is_saturated(self) -> bool:
        return self.cap is not None and self.in_flight >= self.cap

    @property
    def calls_per_job(self) -> float | None:
        return self.calls / self.jobs if self.jobs else None

    @property
    def retry_ratio(self) -> float | None:
        return self.retries / self.calls if self.calls else None


def provider_states(now: dt.datetime | None = None) -> list[ProviderState]:
    now = now or timezone.now()
    providers = list(Provider.objects.filter(is_active=True).order_by("name"))
    running = dict(
        Job.objects.filter(status=Job.Status.RUNNING)
        .order_by()
        .values_list("workload__provider_id")
        .annotate(n=Count("id"))
    )
    calls = {
        provider_id: (n, jobs, retries)
        for provider_id, n, jobs, retries in Attempt.objects.filter(
            started_at__gt=now - RATE_WINDOW, started_at__lte=now
        )
        .order_by()
        .values_list("provider_id")
        .annotate(
            n=Count("id"),
            jobs=Count("job_id", distinct=True),
            retries=Count("id", filter=Q(number__gt=1)),
        )
    }
    states = []
    for provider in providers:
        in_flight, source = provider_in_flight(provider, running.get(provider.pk, 0))
        breaker, detail = breaker_state(provider)
        n, jobs, retries = calls.get(provider.pk, (0, 0, 0))
        states.append(
            ProviderState(
                provider=provider,
                in_flight=in_flight,
                cap=provider.max_concurrency,
                breaker=breaker,
                breaker_detail=detail,
                in_flight_source=source,
                calls=n,
                jobs=jobs,
                retries=retries,
            )
        )
    return states


def provider_in_flight(provider: Provider, running_jobs: int) -> tuple[int, str]:
    """In-flight calls of `provider`: its live concurrency leases in Redis when it has a cap
    (jobs.flow.leases), else the number of running jobs on it from the database."""
    if not provider.max_concurrency:
        return running_jobs, "database"
    resource = leases.Resource(f"provider:{provider.pk}", provider.name, provider.max_concurrency)
    try:
        return leases.in_use(resource), "leases"
    except Exception:  # noqa: BLE001 - Redis down: the dashboard still renders from the DB
        return running_jobs, "database"


def breaker_state(provider: Provider) -> tuple[str, dict[str, Any]]:
    """The circuit breaker's state for `provider`, read from Redis (jobs.flow.breaker).

    "unknown" when Redis cannot be read: the page still renders from the database.
    """
    try:
        status = breaker.status(provider, history=1)
    except Exception:  # noqa: BLE001 - Redis down must not break the dashboard
        return "unknown", {}
    return status.state, {
        "failures": status.failures,
        "opened_at": status.opened_at,
        "probe_at": status.probe_at,
        "probe_successes": status.probe_successes,
        # The failure-rate rule: the window now, against the provider's threshold.
        "failure_rate": status.failure_rate,
        "window_calls": status.window_calls,
        "threshold": provider.breaker_failure_rate,
        "min_calls": provider.breaker_min_calls,
    }


# --- Budgets ------------------------------------------------------------------------------------


def budget_rows() -> list[Budget]:
    """Every budget, global ones first, with its live counters (spent, reserved, cap for the
    current period; jobs.flow.budgets keeps them exact)."""
    return list(
        Budget.objects.select_related("workload", "user", "api_token").order_by(
            F("workload__name").asc(nulls_first=True), "name"
        )
    )


# --- Time series ----------------------------------------------------------------------------


@dataclass
class Series:
    """Buckets of equal length ending at `now` (the last one is partial)."""

    span: str
    bucket: dt.timedelta
    starts: list[dt.datetime]
    throughput: list[float]  # jobs finished per minute in each bucket
    run_time_p95: list[float | None]  # seconds
    queue_wait_p95: list[float | None]  # seconds
    spend: list[Decimal]  # USD per bucket
    queued: list[int]  # queued jobs at the end of each bucket
    backlog: list[int]  # waiting + held jobs at the end of each bucket
    # The same buckets split by workload (jobs finished per minute, run time p95, spend) and
    # by provider (calls started per minute, call duration p95, spend): name → values, the
    # biggest SPLIT_LIMIT - 1 by volume and the rest summed as "others" (p95: left out).
    by_workload: dict[str, dict[str, list]] = field(default_factory=dict)
    by_provider: dict[str, dict[str, list]] = field(default_factory=dict)


SPLIT_LIMIT = 8
OTHERS = "others"


SPANS = {
    "hour": (dt.timedelta(minutes=1), 60, TruncMinute),
    "day": (dt.timedelta(hours=1), 24, TruncHour),
}


def floor_to(moment: dt.datetime, bucket: dt.timedelta) -> dt.datetime:
    moment = moment.astimezone(dt.UTC)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + ((moment - epoch) // bucket) * bucket


def series(span: str, now: dt.datetime | None = None) -> Series:
    """Throughput, latency, spend and queue depth over the last hour (1-minute buckets) or day
    (1-hour buckets), from the ledger and the audit log."""
    now = now or timezone.now()
    bucket, count, trunc = SPANS[span]
    last = floor_to(now, bucket)
    starts = [last - bucket * (count - 1 - i) for i in range(count)]
    since = starts[0]
    index = {start: i for i, start in enumerate(starts)}

    def split(rows: Iterable[tuple[dt.datetime, str, Any]]) -> dict[str, dict[int, Any]]:
        out: dict[str, dict[int, Any]] = defaultdict(dict)
        for moment, name, value in rows:
            i = index.get(floor_to(moment, bucket))
            if i is not None:
                out[name][i] = out[name].get(i, 0) + value
        return out

    utc = dt.UTC
    finished_by_workload = split(
        Job.objects.filter(finished_at__gte=since, finished_at__lte=now)
        .annotate(b=trunc("finished_at", tzinfo=utc))
        .order_by()
        .values_list("b", "workload__name")
        .annotate(n=Count("id"))
    )
    finished = _summed(finished_by_workload)
    minutes = bucket.total_seconds() / 60
    attempts = (
        Attempt.objects.filter(started_at__gte=since, started_at__lte=now)
        .annotate(b=trunc("started_at", tzinfo=utc))
        .order_by()
    )
    spend_by_workload = split(
        attempts.values_list("b", "job__workload__name").annotate(s=Sum("cost"))
    )
    spend_by_provider = split(attempts.values_list("b", "provider__name").annotate(s=Sum("cost")))
    calls_by_provider = split(attempts.values_list("b", "provider__name").annotate(n=Count("id")))
    spend = _summed(spend_by_provider)

    run_samples: dict[int, list[float]] = defaultdict(list)
    run_samples_by_workload: dict[str, dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for started_at, finished_at, name in bounded(
        Job.objects.filter(
            finished_at__gte=since, finished_at__lte=now, started_at__isnull=False
        ).order_by()
    ).values_list("started_at", "finished_at", "workload__name"):
        i = index.get(floor_to(finished_at, bucket))
        if i is not None:
            seconds = (finished_at - started_at).total_seconds()
            run_samples[i].append(seconds)
            run_samples_by_workload[name][i].append(seconds)
    call_samples_by_provider: dict[str, dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for started_at, ended_at, name in bounded(
        Attempt.objects.filter(ended_at__gte=since, ended_at__lte=now).order_by()
    ).values_list("started_at", "ended_at", "provider__name"):
        i = index.get(floor_to(ended_at, bucket))
        if i is not None:
            call_samples_by_provider[name][i].append((ended_at - started_at).total_seconds())
    wait_samples: dict[int, list[float]] = defaultdict(list)
    for queued_at, created_at, started_at in bounded(
        Job.objects.filter(started_at__gte=since, started_at__lte=now).order_by()
    ).values_list("queued_at", "created_at", "started_at"):
        i = index.get(floor_to(started_at, bucket))
        if i is not None:
            wait_samples[i].append(max((started_at - (queued_at or created_at)).total_seconds(), 0))

    queued = _depth_series([Job.Status.QUEUED], starts, bucket, now, trunc)
    backlog = _depth_series(list(BACKLOG_STATUSES), starts, bucket, now, trunc)
    return Series(
        span=span,
        bucket=bucket,
        starts=starts,
        throughput=[finished.get(i, 0) / minutes for i in range(count)],
        run_time_p95=[percentile(run_samples.get(i, []), 95) for i in range(count)],
        queue_wait_p95=[percentile(wait_samples.get(i, []), 95) for i in range(count)],
        spend=[Decimal(spend.get(i) or 0) for i in range(count)],
        queued=queued,
        backlog=backlog,
        by_workload={
            "throughput": _top(finished_by_workload, count, lambda n: n / minutes),
            "spend": _top(spend_by_workload, count, Decimal),
            "run_time_p95": _top_percentiles(run_samples_by_workload, finished_by_workload, count),
        },
        by_provider={
            "calls": _top(calls_by_provider, count, lambda n: n / minutes),
            "spend": _top(spend_by_provider, count, Decimal),
            "call_time_p95": _top_percentiles(call_samples_by_provider, calls_by_provider, count),
        },
    )


def _summed(by_name: dict[str, dict[int, Any]]) -> dict[int, Any]:
    total: dict[int, Any] = {}
    for buckets in by_name.values():
        for i, value in buckets.items():
            total[i] = total.get(i, 0) + value
    return total


def _ranked(by_name: dict[str, dict[int, Any]]) -> list[str]:
    return sorted(by_name, key=lambda name: (-sum(by_name[name].values()), name))


def _top(by_name: dict[str, dict[int, Any]], count: int, convert) -> dict[str, list]:
    """name → one value per bucket, the biggest names first, the tail summed as OTHERS."""
    names = _ranked(by_name)
    keep, rest = names[: SPLIT_LIMIT - 1], names[SPLIT_LIMIT - 1 :]
    if len(rest) == 1:
        keep, rest = names, []
    out = {name: [convert(by_name[name].get(i, 0)) for i in range(count)] for name in keep}
    if rest:
        tail = _summed({name: by_name[name] for name in rest})
        out[OTHERS] = [convert(tail.get(i, 0)) for i in range(count)]
    return out


def _top_percentiles(
    samples: dict[str, dict[int, list[float]]], volume: dict[str, dict[int, Any]], count: int
) -> dict[str, list]:
    """The p95 of each of the biggest names by `volume` (a percentile of "others" would mean
    nothing)."""
    names = [name for name in _ranked(volume) if name in samples][:SPLIT_LIMIT]
    return {
        name: [percentile(samples[name].get(i, []), 95) for i in range(count)] for name in names
    }


def _depth_series(
    statuses: list[str],
    starts: list[dt.datetime],
    bucket: dt.timedelta,
    now: dt.datetime,
    trunc: Any,
) -> list[int]:
    """How many jobs were in `statuses` at the end of each bucket, reconstructed from the audit
    log: start from the count now and undo, bucket by bucket going back, the net change the
    events of each bucket made (an event into the set adds one, out of it removes one)."""
    current = Job.objects.filter(status__in=statuses).count()
    entered = Q(to_status__in=statuses) & ~Q(from_status__in=statuses)
    left = Q(from_status__in=statuses) & ~Q(to_status__in=statuses)
    deltas: dict[dt.datetime, int] = {}
    for b, n_in, n_out in (
        JobEvent.objects.filter(created_at__gte=starts[0], created_at__lte=now)
        .filter(entered | left)
        .annotate(b=trunc("created_at", tzinfo=dt.UTC))
        .order_by()
        .values_list("b")
        .annotate(n_in=Count("id", filter=entered), n_out=Count("id", filter=left))
    ):
        deltas[floor_to(b, bucket)] = n_in - n_out
    depths = [0] * len(starts)
    depth = current
    for i in range(len(starts) - 1, -1, -1):
        depths[i] = depth
        depth -= deltas.get(starts[i], 0)
    return depths


# --- Everything the dashboard shows ------------------------------------------------------------


@dataclass
class Snapshot:
    now: dt.datetime
    overall: Figures
    workloads: list[Figures]
    providers: list[ProviderState]
    budgets: list[Budget]
    series: dict[str, Series]


def snapshot(now: dt.datetime | None = None, spans: Iterable[str] = ("hour",)) -> Snapshot:
    """Everything the dashboard shows, with the time series of the requested spans only."""
    now = now or timezone.now()
    overall, workloads = workload_figures(now)
    return Snapshot(
        now=now,
        overall=overall,
        workloads=workloads,
        providers=provider_states(now),
        budgets=budget_rows(),
        series={span: series(span, now) for span in spans},
    )
