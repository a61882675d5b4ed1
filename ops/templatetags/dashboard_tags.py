"""Formatting for the dashboard's figures. A missing figure (no data in the window) shows "–"."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django import template

register = template.Library()

MISSING = "–"


@register.filter
def percent(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.1f}%"


@register.filter
def seconds(value: float | None) -> str:
    """A duration in seconds, in the largest unit that keeps it readable."""
    if value is None:
        return MISSING
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


@register.filter
def age(value: dt.timedelta | None) -> str:
    return MISSING if value is None else seconds(value.total_seconds())


@register.filter
def usd(value: Decimal | float | None) -> str:
    if value is None:
        return MISSING
    value = Decimal(value)
    if value and abs(value) < Decimal("0.01"):
        # A call costs fractions of a cent: four decimals showed real spend as "$0.0000".
        return f"${value:,.6f}"
    return f"${value:,.4f}" if abs(value) < 1 else f"${value:,.2f}"


@register.filter
def per_minute(value: float) -> str:
    return f"{value:.1f}"
