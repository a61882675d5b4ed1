// The dashboard's trend charts, drawn by the vendored uPlot (static/vendor/uplot).
// The data is the page's <script type="application/json" id="chart-data"> (ops/charts.py),
// which every live refresh of the dashboard brings again from the same snapshot as the tiles.
// Each chart's <div class="plot" data-chart="key" hx-preserve> is kept across refreshes, so the
// chart is given the new data in place: a hover or a zoom survives a refresh.
// Point at a chart for the values of that bucket (uPlot's legend under it); drag across it to
// zoom in on a time range; double-click or "Reset zoom" to see the whole span again.
// Without JS the figure still shows each line's latest value and the peak as text.
(function () {
  "use strict";

  var HEIGHT = 170;
  var FALLBACK = ["#2f5bd3", "#b7791f", "#1f8a4c", "#c0392b", "#7b3fb8", "#0f8b8d", "#d35f9a", "#6b7280"];

  // The same rule as ops/charts.fmt, so the axis, the hover values and the text agree.
  function fmt(value, unit) {
    if (value === null || value === undefined) return "–";
    if (unit === "$") {
      return value < 1 ? "$" + value.toFixed(4)
        : "$" + value.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    }
    if (value >= 100 || value === Math.round(value)) return Math.round(value).toLocaleString("en-US") + unit;
    return value.toFixed(2) + unit;
  }

  function timeLabel(seconds) {
    var d = new Date(seconds * 1000);
    return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " +
      d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  // Each line in its colour from the stylesheet (.key-N of the figure's text legend).
  function colours(figure, n) {
    var out = [];
    for (var i = 0; i < n; i++) {
      var key = figure.querySelector(".key-" + i);
      out.push(key ? window.getComputedStyle(key).color : FALLBACK[i % FALLBACK.length]);
    }
    return out;
  }

  function readData() {
    var node = document.getElementById("chart-data");
    if (!node) return null;
    try { return JSON.parse(node.textContent); } catch (e) { return null; }
  }

  function labelsOf(spec) {
    return spec.series.map(function (s) { return s.label; }).join("\u0000");
  }

  function showZoom(el) {
    var note = el.querySelector(".zoomed");
    var zoom = el._zoom;
    el.toggleAttribute("data-zoomed", !!zoom);
    if (!note) return;
    note.hidden = !zoom;
    if (zoom) note.querySelector("span").textContent =
      "Zoomed to " + timeLabel(zoom.min) + " – " + timeLabel(zoom.max);
  }

  function build(el, spec, data) {
    var figure = el.closest("figure") || el;
    var unit = spec.unit;
    var strokes = colours(figure, spec.series.length);
    var series = [{ label: "Time", value: function (u, v) { return v === null ? "–" : timeLabel(v); } }];
    spec.series.forEach(function (s, i) {
      series.push({
        label: s.label,
        stroke: strokes[i],
        width: 2,
        points: { show: true, size: 4 },
        value: function (u, v) { return fmt(v, unit); }
      });
    });
    var holder = document.createElement("div");
    var opts = {
      width: Math.max(el.clientWidth - 2, 200),
      height: HEIGHT,
      series: series,
      scales: { x: { time: true } },
      axes: [
        { stroke: "#6b7280", grid: { stroke: "#e3e6eb" } },
        { stroke: "#6b7280", grid: { stroke: "#e3e6eb" }, size: 64,
          values: function (u, ticks) { return ticks.map(function (v) { return fmt(v, unit); }); } }
      ],
      cursor: { drag: { x: true, y: false, setScale: true } },
      legend: { live: true },
      hooks: {
        setSelect: [function (u) {
          if (u.select.width < 2) return;
          el._zoom = {
            min: u.posToVal(u.select.left, "x"),
            max: u.posToVal(u.select.left + u.select.width, "x")
          };
          showZoom(el);
        }]
      }
    };
    el.textContent = "";
    var note = document.createElement("p");
    note.className = "zoomed";
    note.hidden = true;
    note.appendChild(document.createElement("span"));
    var reset = document.createElement("button");
    reset.type = "button";
    reset.className = "small link";
    reset.textContent = "Reset zoom";
    reset.addEventListener("click", function () { unzoom(el); });
    note.appendChild(document.createTextNode(" "));
    note.appendChild(reset);
    el.appendChild(holder);
    el.appendChild(note);
    var plot = new window.uPlot(opts, data, holder);
    plot.over.addEventListener("dblclick", function () { el._zoom = null; showZoom(el); });
    el._plot = plot;
    el._labels = labelsOf(spec);
    return plot;
  }

  function unzoom(el) {
    el._zoom = null;
    var plot = el._plot;
    if (plot) {
      var xs = plot.data[0];
      plot.setScale("x", { min: xs[0], max: xs[xs.length - 1] });
    }
    showZoom(el);
  }

  function render() {
    if (!window.uPlot) return;
    var all = readData();
    if (!all) return;
    var plots = document.querySelectorAll(".plot[data-chart]");
    Array.prototype.forEach.call(plots, function (el) {
      var spec = all.charts[el.getAttribute("data-chart")];
      if (!spec) return;
      var data = [all.x].concat(spec.series.map(function (s) { return s.values; }));
      if (el._plot && el._labels === labelsOf(spec)) {
        el._plot.setData(data);
        if (el._zoom) el._plot.setScale("x", el._zoom);
      } else {
        if (el._plot) el._plot.destroy();
        build(el, spec, data);
        if (el._zoom) el._plot.setScale("x", el._zoom);
      }
      showZoom(el);
    });
  }

  function resize() {
    var plots = document.querySelectorAll(".plot[data-chart]");
    Array.prototype.forEach.call(plots, function (el) {
      if (el._plot) el._plot.setSize({ width: Math.max(el.clientWidth - 2, 200), height: HEIGHT });
    });
  }

  document.addEventListener("DOMContentLoaded", render);
  // Every live refresh of the dashboard (htmx swaps #dashboard-live) brings new data.
  document.body.addEventListener("htmx:afterSettle", render);
  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(resize, 150);
  });
})();
