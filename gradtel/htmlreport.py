"""``gradtel report FILE --html OUT``: one self-contained HTML page of a ``gradtel.report/v1`` report.

Why SVG written here: the page must open anywhere (a CI artifact, a laptop offline), so nothing may be fetched, and
gradtel must stay a light install, so no plotting library. The history holds at most 512 points per series, which
a few ``<polyline>`` elements draw exactly: the page of a 100-layer model is some hundred kilobytes, inline CSS, no
script. Every chart says on its ``<svg>`` element how it maps steps and values to pixels (``data-x-min``...,
``data-plot``), so a reader, or a test, can read the plotted values back.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from gradtel import render
from gradtel.vocabulary import State

#: Plot area inside every chart's SVG: left, top, width, height (pixels).
PLOT = (70.0, 16.0, 760.0, 200.0)
SVG_WIDTH, SVG_HEIGHT = 850, 250
#: Layers drawn in the per-layer norm chart, and rows of the states timeline.
LAYER_LINES = 8
TIMELINE_ROWS = 60
VARIABLE_ROWS = 200
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
STATE_COLORS: dict[str, str] = {
    State.OK: "#c8e6c9",
    State.EXPECTED_MISSING: "#e0e0e0",
    State.MISSING: "#ffb74d",
    State.ZERO: "#64b5f6",
    State.NONFINITE: "#e53935",
}
LEGEND_NAMES = {
    "global_norm_max": "largest in each point",
    "global_norm_min": "smallest in each point",
    "nonfinite": "NaN/Inf",
    "zero": "all-zero",
    "missing": "missing (None)",
}
STATE_MEANING: dict[str, str] = {
    State.OK: "a finite, non-zero gradient",
    State.EXPECTED_MISSING: "no gradient, declared expected",
    State.MISSING: "no gradient (None)",
    State.ZERO: "an all-zero gradient",
    State.NONFINITE: "NaN or Inf",
}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 900px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
.finding { border-left: 4px solid #999; padding: .3em .8em; margin: .6em 0; background: #fafafa; }
.finding.origin { border-color: #e53935; background: #fdecea; }
table { border-collapse: collapse; font-size: .85em; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; } .muted { color: #777; font-size: .85em; }
svg text { font-size: 11px; fill: #444; } .legend span { margin-right: 1em; font-size: .85em; }
"""


class _Axes:
    """The mapping of one chart: steps to x (linear), values to y (linear, or log10 over a wide positive range)."""

    def __init__(self, x_range: tuple[float, float], values: Sequence[float]) -> None:
        self.x_min, self.x_max = x_range
        if self.x_max <= self.x_min:
            self.x_max = self.x_min + 1.0
        finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
        low, high = min(finite), max(finite)
        self.log = low > 0 and high / low > 100
        if not self.log:
            low = min(low, 0.0)
        if high <= low:
            high = low + (abs(low) or 1.0)
        self.y_min, self.y_max = low, high

    def _scaled(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def x(self, step: float) -> float:
        left, _, width, _ = PLOT
        return left + (step - self.x_min) / (self.x_max - self.x_min) * width

    def y(self, value: float) -> float:
        _, top, _, height = PLOT
        low, high = self._scaled(self.y_min), self._scaled(self.y_max)
        return top + height - (self._scaled(value) - low) / (high - low) * height

    def open_svg(self, label: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}" role="img" '
            f'aria-label="{html.escape(label)}" class="chart" data-x-min="{self.x_min!r}" '
            f'data-x-max="{self.x_max!r}" data-y-min="{self.y_min!r}" data-y-max="{self.y_max!r}" '
            f'data-y-scale="{"log" if self.log else "linear"}" data-plot="{",".join(map(repr, PLOT))}">'
        )

    def frame(self, y_label: str) -> list[str]:
        left, top, width, height = PLOT
        parts = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#bbb"/>']
        for i in range(5):
            step = self.x_min + (self.x_max - self.x_min) * i / 4
            parts.append(
                f'<text x="{self.x(step):.1f}" y="{top + height + 14}" text-anchor="middle">{step:,.0f}</text>'
            )
        for value in self._y_ticks():
            parts.append(
                f'<line x1="{left}" x2="{left + width}" y1="{self.y(value):.1f}" y2="{self.y(value):.1f}" '
                'stroke="#eee"/>'
            )
            parts.append(f'<text x="{left - 4}" y="{self.y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<text x="{left + width / 2}" y="{top + height + 30}" text-anchor="middle">optimizer step</text>')
        parts.append(
            f'<text x="12" y="{top + height / 2}" transform="rotate(-90 12 {top + height / 2})" '
            f'text-anchor="middle">{html.escape(y_label)}{" (log)" if self.log else ""}</text>'
        )
        return parts

    def _y_ticks(self) -> list[float]:
        if self.log:
            first, last = math.ceil(math.log10(self.y_min)), math.floor(math.log10(self.y_max))
            stride = max(1, (last - first) // 5 + 1)
            return [10.0**e for e in range(first, last + 1, stride)]
        return [self.y_min + (self.y_max - self.y_min) * i / 4 for i in range(5)]


def _midpoints(history: dict[str, Any]) -> list[float]:
    """Where a point is plotted: the middle of the steps it covers (the step itself at one step per point)."""
    return [(a + b) / 2 for a, b in zip(history["first_step"], history["last_step"], strict=True)]


def _polylines(
    axes: _Axes, name: str, xs: Sequence[float], ys: Sequence[float | None], color: str, dash: str = ""
) -> list[str]:
    """One ``<polyline>`` per run of points that have a value (a missing value breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys, strict=True):
        if y is None or not math.isfinite(y) or (axes.log and y <= 0):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((x, y))
    out = []
    for run in runs:
        if not run:
            continue
        points = " ".join(f"{axes.x(x):.3f},{axes.y(y):.3f}" for x, y in run)
        if len(run) == 1:  # one point alone: a dot, still read back from its polyline
            out.append(f'<circle cx="{axes.x(run[0][0]):.3f}" cy="{axes.y(run[0][1]):.3f}" r="2" fill="{color}"/>')
        out.append(
            f'<polyline data-series="{html.escape(name)}" points="{points}" fill="none" stroke="{color}" '
            f'stroke-width="1.5"{f" stroke-dasharray={dash!r}" if dash else ""}/>'
        )
    return out


def _marker(axes: _Axes, step: int, label: str) -> str:
    _, top, _, height = PLOT
    x = axes.x(step)
    return (
        f'<line class="marker" data-step="{step}" x1="{x:.3f}" x2="{x:.3f}" y1="{top}" y2="{top + height}" '
        f'stroke="#e53935" stroke-dasharray="4 3"/><text x="{x + 4:.1f}" y="{top + 12}" fill="#e53935">'
        f"{html.escape(label)}</text>"
    )


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="legend">'
        + "".join(
            f'<span><span style="color:{color}">&#9632;</span> {html.escape(name)}</span>' for name, color in entries
        )
        + "</div>"
    )


def _line_chart(
    label: str,
    y_label: str,
    history: dict[str, Any],
    series: Sequence[tuple[str, Sequence[Any], str]],
    markers: Sequence[tuple[int, str]],
) -> str:
    xs = _midpoints(history)
    x_range = (float(history["first_step"][0]), float(history["last_step"][-1]))
    values = [float(v) for _, ys, _ in series for v in ys if v is not None]
    axes = _Axes(x_range, values)
    parts = [axes.open_svg(label), *axes.frame(y_label)]
    for name, ys, color in series:
        parts += _polylines(axes, name, xs, ys, color)
    parts += [_marker(axes, step, text) for step, text in markers]
    parts.append("</svg>")
    return "\n".join(parts) + _legend([(LEGEND_NAMES.get(name, name), color) for name, _, color in series])


def _timeline(history: dict[str, Any], origin_layers: set[str], markers: Sequence[tuple[int, str]]) -> str:
    """Layers by points, coloured by each layer's worst state: one ``<rect>`` per run of equal states."""
    series = history["series"]

    def first_bad(s: dict[str, Any]) -> tuple[int, int]:
        bad = [i for i, state in enumerate(s["state"]) if state not in ("ok", "expected_missing")]
        return (0 if s["layer"] in origin_layers else 1, bad[0] if bad else 1 << 30)

    ordered = sorted(series, key=first_bad)
    shown, rest = ordered[:TIMELINE_ROWS], len(ordered) - TIMELINE_ROWS
    row_height, label_width = 14.0, 180.0
    axes = _Axes((float(history["first_step"][0]), float(history["last_step"][-1])), [0.0, 1.0])
    left, _, width, _ = PLOT
    scale = (width + left - label_width) / width
    height = row_height * len(shown) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{height:.0f}" role="img" '
        f'aria-label="states timeline" class="timeline" data-x-min="{axes.x_min!r}" '
        f'data-x-max="{axes.x_max!r}">'
    ]

    def x(step: float) -> float:
        return label_width + (axes.x(step) - left) * scale

    for row, s in enumerate(shown):
        y = row * row_height
        name = s["layer"] or "(top level)"
        parts.append(f'<text x="{label_width - 4}" y="{y + 11}" text-anchor="end">{html.escape(name[-28:])}</text>')
        start = 0
        states = s["state"]
        for i in range(1, len(states) + 1):
            if i < len(states) and states[i] == states[start]:
                continue
            first, last = history["first_step"][start], history["last_step"][i - 1]
            state = states[start]
            parts.append(
                f'<rect data-layer="{html.escape(s["layer"])}" data-state="{state}" data-first-step="{first}" '
                f'data-last-step="{last}" x="{x(first - 0.5):.2f}" y="{y + 1}" '
                f'width="{max(0.5, x(last + 0.5) - x(first - 0.5)):.2f}" height="{row_height - 2}" '
                f'fill="{STATE_COLORS.get(state, "#fff")}"><title>{html.escape(name)}: {state} '
                f"(steps {first}-{last})</title></rect>"
            )
            start = i
    bottom = row_height * len(shown)
    for step, text in markers:
        parts.append(
            f'<line class="marker" data-step="{step}" x1="{x(step):.2f}" x2="{x(step):.2f}" y1="0" '
            f'y2="{bottom}" stroke="#000" stroke-dasharray="4 3"/>'
        )
        parts.append(f'<text x="{x(step) + 4:.1f}" y="{bottom + 12}">{html.escape(text)}</text>')
    parts.append(f'<text x="{label_width}" y="{bottom + 26}">step {axes.x_min:,.0f}</text>')
    parts.append(f'<text x="{SVG_WIDTH - 10}" y="{bottom + 26}" text-anchor="end">step {axes.x_max:,.0f}</text>')
    parts.append("</svg>")
    legend = _legend([(f"{state}: {STATE_MEANING[state]}", color) for state, color in STATE_COLORS.items()])
    more = f'<p class="muted">{rest} more layers not drawn (their states are in the report).</p>' if rest > 0 else ""
    return "\n".join(parts) + legend + more


def _layer_lines(history: dict[str, Any], origin_layers: set[str]) -> list[tuple[str, Sequence[Any], str]]:
    """The origin's layers, then the layers of the largest peak norm, up to LAYER_LINES."""

    def peak(s: dict[str, Any]) -> float:
        return max((v for v in s["norm_max"] if v is not None), default=-1.0)

    ordered = sorted(history["series"], key=lambda s: (s["layer"] not in origin_layers, -peak(s)))
    chosen = [s for s in ordered if peak(s) >= 0][:LAYER_LINES]
    return [(s["layer"] or "(top level)", s["norm_max"], PALETTE[i % len(PALETTE)]) for i, s in enumerate(chosen)]


def _optimizer_section(optimizer: dict[str, Any], origin: dict[str, Any] | None) -> str:
    name = html.escape(optimizer["name"])
    history = optimizer.get("history")
    head = f"<h2>Optimizer <code>{name}</code>: {optimizer['steps']:,} steps</h2>"
    if not history or not history["global"]["last_step"]:
        return head + "<p>No step was measured, so there is no history.</p>"
    glob, layers = history["global"], history["layers"]
    markers = [(origin["step"], f"NaN/Inf begins (step {origin['step']})")] if origin else []
    origin_layers = set(origin["layers"]) if origin else set()
    per_point = glob["steps_per_point"]
    parts = [
        head,
        f'<p class="muted">{len(glob["last_step"])} points, each covering up to {per_point} step(s): a '
        "point keeps the largest (dark line) and the smallest (light line) value of its steps, so no spike "
        "is averaged away.</p>",
        "<h3>Global gradient norm</h3>",
        "<p>The L2 norm of all finite gradients together, per step. A climb before a NaN is an explosion; a "
        "fall toward zero is vanishing.</p>",
        _line_chart(
            "global gradient norm",
            "global norm",
            glob,
            [
                ("global_norm_max", glob["global_norm_max"], "#1f77b4"),
                ("global_norm_min", glob["global_norm_min"], "#9ecae1"),
            ],
            markers,
        ),
        "<h3>Unhealthy variables per step</h3>",
        "<p>How many variables had a missing (not declared expected), all-zero or NaN/Inf gradient at once "
        "(the most within each point).</p>",
        _line_chart(
            "unhealthy variables",
            "variables",
            glob,
            [
                ("nonfinite", glob["nonfinite"], STATE_COLORS["nonfinite"]),
                ("zero", glob["zero"], "#1e88e5"),
                ("missing", glob["missing"], "#fb8c00"),
            ],
            markers,
        ),
    ]
    lines = _layer_lines(layers, origin_layers)
    if lines:
        parts += [
            "<h3>Gradient norm per layer</h3>",
            f"<p>The L2 norm of each layer's finite gradients (largest within each point of up to "
            f"{layers['steps_per_point']} step(s)); at most {LAYER_LINES} layers: where a NaN began, then "
            "the largest.</p>",
            _line_chart("gradient norm per layer", "layer norm", layers, lines, markers),
        ]
    parts += [
        "<h3>States timeline</h3>",
        "<p>Each row is a layer, coloured by its worst variable's state over the steps.</p>",
        _timeline(layers, origin_layers, markers),
    ]
    return "\n".join(parts)


def _findings(report: dict[str, Any]) -> str:
    findings = sorted(report["findings"], key=lambda f: f["category"] != "nonfinite_origin")
    if not findings:
        return "<h2>Findings</h2><p>None: every gradient was healthy at its latest step.</p>"
    parts = ["<h2>Findings</h2>"]
    for f in findings:
        origin = f["category"] == "nonfinite_origin"
        title = (
            f"Where the NaN began: step {f['step']} of {html.escape(f['optimizer'])}"
            if origin
            else html.escape(f["category"])
        )
        names = ", ".join(f"<code>{html.escape(n)}</code>" for n in f["variables"][:20])
        more = f" and {len(f['variables']) - 20} more" if len(f["variables"]) > 20 else ""
        parts.append(
            f'<div class="finding{" origin" if origin else ""}" data-category="{f["category"]}">'
            f"<strong>{title}</strong>: {names}{more}<br>{html.escape(f['explanation'])}</div>"
        )
    return "\n".join(parts)


def _variables_table(report: dict[str, Any]) -> str:
    rows = render.worst_variables(report, VARIABLE_ROWS)
    if not rows:
        return ""
    head = ("variable", "layer", "status", "first non-finite", "first zero", "first missing", "steps", "last norm")
    out = [
        "<h2>Unhealthy variables</h2>",
        "<p>Worst first; the steps are the optimizer's, 1-based.</p>",
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>",
    ]
    for v in rows:
        cells = (
            v["name"],
            v["layer"],
            v["status"],
            v.get("first_nonfinite_step"),
            v.get("first_zero_step"),
            v.get("first_missing_step"),
            v["steps"],
            render.norm_text(v.get("last_norm")),
        )
        out.append("<tr>" + "".join(f"<td>{html.escape('-' if c is None else str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join([*out, "</table>"])


def page(report: dict[str, Any]) -> str:
    """The whole HTML page of ``report`` (no external resource, no script)."""
    origins = {f["optimizer"]: f for f in report["findings"] if f["category"] == "nonfinite_origin"}
    run = html.escape(str(report.get("run_id") or "-"))
    intro = (
        "<p>gradtel measured, at every training step, the gradient of every variable the optimizer updates: "
        "whether it was missing (None: the variable does not train), all zeros, or NaN/Inf, and its size "
        "(L2 norm). This page shows what it found and how the gradients evolved over the run.</p>"
    )
    body = [
        f"<h1>gradtel report: run {run}</h1>",
        f'<p class="muted">generated {html.escape(str(report.get("generated_at", "-")))}, '
        f"{len(report['variables'])} variables, {len(report['optimizers'])} optimizer(s)</p>",
        intro,
        _findings(report),
        *(
            f'<section data-optimizer="{html.escape(o["name"])}">{_optimizer_section(o, origins.get(o["name"]))}'
            "</section>"
            for o in report["optimizers"]
        ),
        _variables_table(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>gradtel report {run}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
