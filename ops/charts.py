"""Server-rendered line charts as inline SVG: no JavaScript, nothing for the strict CSP to
block (SVG presentation attributes are not inline styles), and the same markup serves the
first page load and every live refresh of the dashboard."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

WIDTH = 600
HEIGHT = 140
PAD_LEFT = 4
PAD_TOP = 8
PAD_BOTTOM = 4

Number = float | int | Decimal | None


@dataclass
class Line:
    label: str
    css_class: str
    points: str  # "x,y x,y …" in the chart's viewBox; None values break nothing, they are skipped
    last: str  # the latest value, formatted
    dot: bool = False  # one point only: drawn as a dot (a polyline of one point shows nothing)


@dataclass
class Chart:
    title: str
    unit: str
    lines: list[Line]
    max_label: str
    start_label: str
    end_label: str
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def view_box(self) -> str:
        return f"0 0 {self.width} {self.height}"


def _fmt(value: float, unit: str) -> str:
    if unit == "$":
        return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}{unit}"
    return f"{value:,.2f}{unit}"


def line_chart(
    title: str,
    unit: str,
    starts: Sequence[dt.datetime],
    lines: Sequence[tuple[str, str, Sequence[Number]]],
    *,
    time_format: str = "%H:%M",
) -> Chart:
    """One chart of several lines over the same buckets. `lines` are (label, css class, values)."""
    floats = [[None if v is None else float(v) for v in values] for _label, _cls, values in lines]
    peak = max((v for values in floats for v in values if v is not None), default=0.0)
    top = peak if peak > 0 else 1.0
    n = max(len(starts), 2)
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    built = []
    for (label, css_class, _values), values in zip(lines, floats, strict=True):
        coords = []
        for i, value in enumerate(values):
            if value is None:
                continue
            x = PAD_LEFT + i * (WIDTH - PAD_LEFT) / (n - 1)
            y = PAD_TOP + plot_h * (1 - value / top)
            coords.append(f"{x:.1f},{y:.1f}")
        latest = next((v for v in reversed(values) if v is not None), None)
        dot = len(coords) == 1
        if dot:
            coords.append(coords[0])  # a zero-length segment: its round caps draw the dot
        built.append(
            Line(
                label=label,
                css_class=css_class,
                points=" ".join(coords),
                last="–" if latest is None else _fmt(latest, unit),
                dot=dot,
            )
        )
    return Chart(
        title=title,
        unit=unit,
        lines=built,
        max_label=_fmt(peak, unit),
        start_label=starts[0].strftime(time_format) if starts else "",
        end_label="now",
    )
