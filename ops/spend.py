"""Spend where people look for it: what the ledger has charged today and this month, per
workload, per provider and model, per submitter and per API token.

The sums are the dashboard's (ops.stats): `Attempt.cost` of the calls started since the start
of today / of this month in the configured time zone, failed calls included (a provider bills
them too). A call still in flight counts once it settles (jobs.ledger).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db.models import Count, Q, Sum
from django.utils import timezone

from jobs.models import ApiToken, Attempt, Provider, Workload
from ops.stats import day_start, month_start


@dataclass(frozen=True)
class Row:
    label: str
    detail: str  # a second line: the token's owner, the provider's kind, ...
    today: Decimal
    month: Decimal
    calls_today: int
    calls_month: int
    tokens_month: int  # input + output tokens


@dataclass(frozen=True)
class Table:
    slug: str
    title: str
    column: str
    rows: list[Row]

    @property
    def month_total(self) -> Decimal:
        return sum((row.month for row in self.rows), Decimal(0))


# slug, title, first column, the Attempt fields grouped on
DIMENSIONS = (
    ("workload", "Per workload", "Workload", ("job__workload_id",)),
    ("model", "Per provider and model", "Model", ("provider_id", "model")),
    ("user", "Per submitter", "Submitter", ("job__submitted_by_id",)),
    ("token", "Per API token", "API token", ("job__api_token_id",)),
)


def tables(now: dt.datetime | None = None) -> list[Table]:
    """One table per dimension, the month's biggest spenders first."""
    now = now or timezone.now()
    return [
        Table(slug, title, column, _rows(slug, keys, now))
        for slug, title, column, keys in DIMENSIONS
    ]


def _rows(slug: str, keys: tuple[str, ...], now: dt.datetime) -> list[Row]:
    today = day_start(now)
    groups = list(
        Attempt.objects.filter(started_at__gte=month_start(now), started_at__lte=now)
        .order_by()
        .values(*keys)
        .annotate(
            month=Sum("cost"),
            today=Sum("cost", filter=Q(started_at__gte=today)),
            calls_month=Count("id"),
            calls_today=Count("id", filter=Q(started_at__gte=today)),
            tokens_in=Sum("tokens_in"),
            tokens_out=Sum("tokens_out"),
        )
    )
    labels = _labels(slug, [tuple(group[key] for key in keys) for group in groups])
    rows = [
        Row(
            *labels[tuple(group[key] for key in keys)],
            today=group["today"] or Decimal(0),
            month=group["month"] or Decimal(0),
            calls_today=group["calls_today"],
            calls_month=group["calls_month"],
            tokens_month=(group["tokens_in"] or 0) + (group["tokens_out"] or 0),
        )
        for group in groups
    ]
    return sorted(rows, key=lambda row: (-row.month, row.label))


def _labels(slug: str, keys: list[tuple]) -> dict[tuple, tuple[str, str]]:
    """(label, detail) for each group's key, with one query per table for the names."""
    ids = {key[0] for key in keys if key[0] is not None}
    if slug == "workload":
        names = dict(Workload.objects.filter(pk__in=ids).values_list("pk", "name"))
        return {key: (names.get(key[0], f"workload #{key[0]}"), "") for key in keys}
    if slug == "model":
        providers = {p.pk: p for p in Provider.objects.filter(pk__in=ids)}
        return {
            key: (key[1], providers[key[0]].name if key[0] in providers else "") for key in keys
        }
    if slug == "user":
        names = dict(get_user_model().objects.filter(pk__in=ids).values_list("pk", "username"))
        return {
            key: (
                (names.get(key[0], f"user #{key[0]}"), "")
                if key[0] is not None
                else ("No submitter", "its user was deleted, or a system job")
            )
            for key in keys
        }
    tokens = {t.pk: t for t in ApiToken.objects.filter(pk__in=ids).select_related("user")}
    labels = {}
    for key in keys:
        token = tokens.get(key[0])
        if token is None:  # a deleted token's jobs keep their spend but lose the link
            labels[key] = ("No token", "the pages, batches, a session's API calls, deleted tokens")
        else:
            labels[key] = (str(token), f"of {token.user.get_username()}")
    return labels
