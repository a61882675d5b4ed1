"""The dashboard's charts: what each one plots, as data for the vendored uPlot
(static/vendor/uplot, drawn by static/js/charts.js: axes, hover values, drag to zoom), and the
latest value and peak of each line as text, which the page shows with or without JavaScript.

The data travels in the page as JSON (`json_script`, which the CSP allows: it is not run), so
the first load and every live refresh of the dashboard carry the same figures as the tiles
around them, from the same snapshot.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

Number = float | int | Decimal | None

# How the charts may be split (?split=): one line per total, per workload or per provider.
SPLITS = {"total": "Total", "workload": "Per workload", "provider": "Per provider"}


@dataclass
class Line:
    label: str
    values: list[float | None]
    last: str  # the latest value, formatted


@dataclass
class Chart:
    key: str
    title: str
    unit: str
    lines: list[Line]
    max_label: str
    note: str = ""  # said under the title, e.g. why a chart is not split

    def data(self) -> dict:
        return {
            "title": self.title,
            "unit": self.unit,
            "series": [{"label": line.label, "values": line.values} for line in self.lines],
        }


def fmt(value: float, unit: str) -> str:
    """A value with its unit, as the legend and the axis of static/js/charts.js show it."""
    if unit == "$":
        return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}{unit}"
    return f"{value:,.2f}{unit}"


def line_chart(
    key: str,
    title: str,
    unit: str,
    lines: Sequence[tuple[str, Sequence[Number]]],
    *,
    note: str = "",
) -> Chart:
    """One chart of several lines over the same buckets; `lines` are (label, values), a None
    value a bucket with nothing to show (drawn as a gap)."""
    built = []
    for label, values in lines:
        floats = [None if v is None else float(v) for v in values]
        latest = next((v for v in reversed(floats) if v is not None), None)
        built.append(Line(label, floats, "–" if latest is None else fmt(latest, unit)))
    peak = max((v for line in built for v in line.values if v is not None), default=0.0)
    return Chart(key, title, unit, built, fmt(peak, unit), note)


def payload(starts: Sequence[dt.datetime], charts: Sequence[Chart]) -> dict:
    """What static/js/charts.js reads: the bucket starts (Unix seconds) and each chart's lines."""
    return {
        "x": [int(start.timestamp()) for start in starts],
        "charts": {chart.key: chart.data() for chart in charts},
    }
