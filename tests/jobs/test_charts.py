"""The dashboard's server-rendered charts (ops/charts.py): values map onto the viewBox."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from ops import charts

START = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
STARTS = [START + dt.timedelta(minutes=i) for i in range(5)]
BOTTOM = charts.HEIGHT - charts.PAD_BOTTOM


def coords(line: charts.Line) -> list[tuple[float, float]]:
    return [tuple(map(float, pair.split(","))) for pair in line.points.split()]


def test_values_are_scaled_to_the_peak_and_gaps_are_skipped():
    chart = charts.line_chart(
        "Throughput", "/min", STARTS, [("jobs", "line-a", [0, 5, None, 10, 2])]
    )
    [line] = chart.lines
    points = coords(line)
    assert len(points) == 4  # the None bucket is left out
    xs, ys = zip(*points, strict=True)
    assert xs[0] == charts.PAD_LEFT
    assert xs[-1] == charts.WIDTH
    assert ys[0] == BOTTOM  # zero sits on the baseline
    assert ys[2] == charts.PAD_TOP  # the peak touches the top
    assert ys[1] == (charts.PAD_TOP + BOTTOM) / 2  # half the peak, half way up
    assert chart.max_label == "10/min"
    assert line.last == "2/min"
    assert not line.dot
    assert chart.start_label == "09:00"
    assert chart.end_label == "now"


def test_a_lone_value_is_drawn_as_a_dot():
    chart = charts.line_chart(
        "Latency", " s", STARTS, [("p95", "line-a", [None, None, 0.43, None, None])]
    )
    [line] = chart.lines
    assert line.dot
    first, second = coords(line)
    assert first == second  # a zero-length segment, drawn by its round caps
    assert first[1] == charts.PAD_TOP
    assert chart.max_label == "0.43 s"


def test_no_data_draws_nothing_and_says_so():
    chart = charts.line_chart("Spend", "$", STARTS, [("USD", "line-c", [None] * 5)])
    [line] = chart.lines
    assert line.points == ""
    assert not line.dot
    assert line.last == "–"
    assert chart.max_label == "$0.0000"


def test_money_keeps_four_decimals_below_a_dollar():
    chart = charts.line_chart(
        "Spend", "$", STARTS, [("USD", "line-c", [Decimal("0.0024"), Decimal("12.5")])]
    )
    assert chart.lines[0].last == "$12.50"
    assert chart.max_label == "$12.50"
    small = charts.line_chart("Spend", "$", STARTS, [("USD", "line-c", [Decimal("0.0024")])])
    assert small.lines[0].last == "$0.0024"
