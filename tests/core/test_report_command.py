"""``gradtel report``: the done-when scenario through the real CLI (``gradtel run --report`` on a real training
script, then ``gradtel report FILE --html OUT``), the HTML read back with html.parser, and the origin gauge scraped.

The script (tests/core/nan_origin_script.py) makes one variable's gradient NaN at step N; Adam applies it, the
variable turns NaN and every gradient computed through it is NaN at step N + 1.
"""

from __future__ import annotations

import html.parser
import json
import math
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from tests.core.test_cli import BIN, ENV
from tests.core.test_export import exporter, sample, scrape  # noqa: F401  (exporter is a fixture)

SCRIPT = pathlib.Path(__file__).with_name("nan_origin_script.py")
NAN_AT, STEPS = 1000, 1500  # 1,500 steps: 375 points of 4 steps each
OTHERS = ["encoder/kernel", "encoder/bias", "head/kernel", "head/bias"]


@pytest.fixture(scope="module")
def run_report(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    path = tmp_path_factory.mktemp("report") / "report.json"
    result = subprocess.run(
        [BIN / "gradtel", "run", "--report", str(path), "--", sys.executable, str(SCRIPT), str(NAN_AT), str(STEPS)],
        env={**ENV, "OTEL_METRICS_EXPORTER": "none"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"gradtel: nonfinite_origin: culprit/c (at step {NAN_AT} of adam)" in result.stderr
    return path, json.loads(path.read_text())


def test_the_origin_is_the_one_variable_and_the_others_follow_one_step_later(run_report):
    _, report = run_report
    variables = {v["name"]: v for v in report["variables"]}
    assert set(variables) == {"culprit/c", *OTHERS}
    assert variables["culprit/c"]["first_nonfinite_step"] == NAN_AT
    assert all(variables[name]["first_nonfinite_step"] == NAN_AT + 1 for name in OTHERS)
    assert all(v["recovered_nonfinite_step"] is None and v["first_missing_step"] is None for v in variables.values())
    assert variables["culprit/c"]["nonfinite_steps"] == STEPS - NAN_AT + 1
    origin = [f for f in report["findings"] if f["category"] == "nonfinite_origin"]
    assert len(origin) == 1
    assert origin[0]["step"] == NAN_AT and origin[0]["variables"] == ["culprit/c"]
    assert origin[0]["layers"] == ["culprit"] and origin[0]["followed"] == len(OTHERS)
    assert f"before step {NAN_AT}" in origin[0]["explanation"] and "culprit" in origin[0]["explanation"]


def test_the_history_covers_the_whole_run(run_report):
    _, report = run_report
    (optimizer,) = report["optimizers"]
    glob, layers = optimizer["history"]["global"], optimizer["history"]["layers"]
    # 1,500 steps in 512 points: 4 steps per point, except the points of 2 steps not merged yet (gradtel/history.py)
    assert glob["steps_per_point"] == 4 and len(glob["first_step"]) == 512
    assert glob["first_step"][0] == 1 and glob["last_step"][-1] == STEPS
    assert glob["first_step"][1:] == [s + 1 for s in glob["last_step"][:-1]]
    # step 1000 ends a point (steps 999-1000): one variable non-finite; from 1001 on, all five
    at = glob["last_step"].index(NAN_AT)
    before, after = at - 1, at + 1
    assert (
        glob["nonfinite"][before] == 0
        and glob["nonfinite"][at] == 1
        and glob["nonfinite"][after:] == [5] * (len(glob["nonfinite"]) - after)
    )
    assert all(v is not None and v > 0 for v in glob["global_norm_max"][: at + 1])
    assert glob["global_norm_max"][after:] == [None] * (len(glob["last_step"]) - after)  # no finite gradient left
    series = {s["layer"]: s for s in layers["series"]}
    assert series["culprit"]["state"][at] == "nonfinite" and series["encoder"]["state"][at] == "ok"
    assert series["encoder"]["state"][after] == "nonfinite" and series["encoder"]["state"][before] == "ok"
    assert series["encoder"]["norm_max"][0] >= series["encoder"]["norm_min"][0] > 0
    assert series["encoder"]["norm_max"][after] is None and series["culprit"]["norm_max"][after] is None


class _Page(html.parser.HTMLParser):
    """The charts' mappings, polylines, timeline rectangles and markers of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict] = []
        self.timeline: list[dict] = []
        self.external: list[str] = []
        self.optimizer: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag == "section":
            self.optimizer = a.get("data-optimizer")
        elif tag == "svg":
            self.charts.append({"svg": a, "lines": {}, "markers": [], "optimizer": self.optimizer})
        elif tag == "polyline":
            self.charts[-1]["lines"].setdefault(a["data-series"], []).append(a["points"])
        elif tag == "line" and a.get("class") == "marker":
            self.charts[-1]["markers"].append(int(a["data-step"]))
        elif tag == "rect" and "data-state" in a:
            self.timeline.append(a)


def _pixels(chart: dict, step: float, value: float) -> tuple[float, float]:
    """Where the chart's documented mapping (its data-* attributes) puts ``value`` at ``step``."""
    svg = chart["svg"]
    left, top, width, height = (float(v) for v in svg["data-plot"].split(","))
    x_min, x_max = float(svg["data-x-min"]), float(svg["data-x-max"])
    scale = math.log10 if svg["data-y-scale"] == "log" else float
    y_min, y_max = scale(float(svg["data-y-min"])), scale(float(svg["data-y-max"]))
    return (
        left + (step - x_min) / (x_max - x_min) * width,
        top + height - (scale(value) - y_min) / (y_max - y_min) * height,
    )


def _plotted(chart: dict, series: str) -> list[tuple[float, float]]:
    return [
        tuple(float(v) for v in pair.split(",")) for points in chart["lines"].get(series, []) for pair in points.split()
    ]


def _expected(chart: dict, history: dict, values: list) -> list[tuple[float, float]]:
    """The report's points of a series, in pixels (a point without a value, or <= 0 on a log scale, is not drawn)."""
    log = chart["svg"]["data-y-scale"] == "log"
    return [
        _pixels(chart, (a + b) / 2, v)
        for a, b, v in zip(history["first_step"], history["last_step"], values, strict=True)
        if v is not None and (v > 0 or not log)
    ]


def _same_points(plotted: list, expected: list) -> None:
    assert len(plotted) == len(expected) > 0
    for (x, y), (ex, ey) in zip(plotted, expected, strict=True):
        assert x == pytest.approx(ex, abs=0.002) and y == pytest.approx(ey, abs=0.002)


def test_gradtel_report_prints_the_summary_and_writes_a_self_contained_page(run_report, tmp_path):
    path, report = run_report
    out = tmp_path / "report.html"
    result = subprocess.run(
        [BIN / "gradtel", "report", str(path), "--html", str(out)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"NaN/Inf began at step {NAN_AT} of adam in culprit/c" in result.stdout
    assert "global norm " in result.stdout and any(c in result.stdout for c in "▁▂▃▄▅▆▇█")
    worst = result.stdout.split("worst variables:")[1].splitlines()
    assert worst[3].split()[:3] == ["culprit/c", "nonfinite", str(NAN_AT)]

    page = _Page()
    page.feed(out.read_text())
    assert page.external == []  # nothing to fetch: opens offline
    glob = report["optimizers"][0]["history"]["global"]
    assert {c["optimizer"] for c in page.charts} == {"adam"}
    norm_chart = next(c for c in page.charts if "global_norm_max" in c["lines"])
    assert norm_chart["markers"] == [NAN_AT]
    for series in ("global_norm_max", "global_norm_min"):
        _same_points(_plotted(norm_chart, series), _expected(norm_chart, glob, glob[series]))
    counts_chart = next(c for c in page.charts if "nonfinite" in c["lines"])
    _same_points(_plotted(counts_chart, "nonfinite"), _expected(counts_chart, glob, glob["nonfinite"]))
    layers = report["optimizers"][0]["history"]["layers"]
    layer_chart = next(c for c in page.charts if "culprit" in c["lines"])
    for series in layers["series"]:
        _same_points(_plotted(layer_chart, series["layer"]), _expected(layer_chart, layers, series["norm_max"]))
    bad = [r for r in page.timeline if r["data-state"] == "nonfinite"]
    assert {r["data-layer"]: int(r["data-first-step"]) for r in bad} == {
        "culprit": layers["first_step"][layers["last_step"].index(NAN_AT)],  # the point that holds step 1000
        "encoder": NAN_AT + 1,
        "head": NAN_AT + 1,
    }
    assert all(int(r["data-last-step"]) == STEPS for r in bad)


def test_gradtel_report_rejects_what_is_not_a_report(tmp_path):
    not_json, other = tmp_path / "x.json", tmp_path / "y.json"
    not_json.write_text("{oops")
    other.write_text(json.dumps({"schema": "something/v9"}))
    for path, says in (
        (not_json, "is not JSON"),
        (other, "expected schema 'gradtel.report/v1'"),
        (tmp_path / "absent.json", "No such file"),
    ):
        result = subprocess.run(
            [BIN / "gradtel", "report", str(path)], env=ENV, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and says in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_origin_gauge_names_where_the_nan_began(exporter):  # noqa: F811
    first = keras.Variable(np.zeros(2, "float32"), name="first")
    later = keras.Variable(np.zeros(2, "float32"), name="later")
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="origin")
    nan = tf.constant([np.nan, 1.0])
    for g_first, g_later in ((tf.ones(2), tf.ones(2)), (nan, tf.ones(2)), (nan, nan), (nan, nan)):
        opt.apply_gradients([(g_first, first), (g_later, later)])
    metrics = scrape(exporter.endpoint[1])
    base = {"run": "test-run", "optimizer": "origin"}
    assert sample(metrics["gradtel_nonfinite_origin_step"], variable="first", layer="", **base) == 2
    assert not [s for s in metrics["gradtel_nonfinite_origin_step"] if s.labels["variable"] == "later"]
    gradtel.uninstrument(opt)


def test_an_optimizer_without_steps_renders_without_a_history(tmp_path):
    from gradtel import htmlreport, render, reporting

    idle, busy = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)
    gradtel.instrument(idle, name="idle")
    gradtel.instrument(busy, name="busy")
    v = keras.Variable(np.ones(2, "float32"), name="v")
    for _ in range(3):
        busy.apply_gradients([(tf.constant([3.0, 4.0]), v)])
    path = tmp_path / "r.json"
    reporting.write(str(path), gradtel.report())
    report = reporting.load(str(path))
    entries = {o["name"]: o for o in report["optimizers"]}
    assert "history" not in entries["idle"] and entries["busy"]["history"]["global"]["last_step"] == [1, 2, 3]
    assert entries["busy"]["history"]["global"]["global_norm_max"] == [5.0, 5.0, 5.0]
    text = render.report_summary(report)
    assert "idle: no history (no step measured)" in text and "busy: steps 1-3, 3 points of 1 step(s)" in text
    page = _Page()
    page.feed(htmlreport.page(report))
    chart = next(c for c in page.charts if "global_norm_max" in c["lines"] and c["optimizer"] == "busy")
    _same_points(
        _plotted(chart, "global_norm_max"), _expected(chart, entries["busy"]["history"]["global"], [5.0, 5.0, 5.0])
    )
    gradtel.uninstrument(idle)
    gradtel.uninstrument(busy)
