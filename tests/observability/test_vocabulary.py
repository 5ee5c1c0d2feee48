"""One vocabulary (gradtel/vocabulary.py): every state and cause the exporter can emit is one the dashboards and
the rules select where they mean to, and one the runbooks and the report's documentation explain.

The exporter's label values are read from a real scrape of real training; the dashboards and rules from the
generated files that ship (dashboards/*.json, deploy/prometheus/gradtel-rules.yml), their label matchers
evaluated the way Prometheus does (``=~`` and ``!~`` are fully anchored).
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from prometheus_client.parser import text_string_to_metric_families

import gradtel
from gradtel import export, metrics
from gradtel.config import Config
from gradtel.vocabulary import (
    ALL_CAUSES,
    MISSING_CAUSES,
    UNHEALTHY_STATES,
    ZERO_CAUSES,
    Finding,
    MissingCause,
    State,
    ZeroCause,
    cause,
    fix_for,
)
from tests.core.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
OVERVIEW = ROOT / "dashboards" / "gradtel-overview.json"
RULES = ROOT / "deploy" / "prometheus" / "gradtel-rules.yml"
#: ``label op "value"`` inside a selector.
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _selectors(expr: str, metric: str) -> list[list[tuple[str, str, str]]]:
    """The label matchers of every selector of ``metric`` in a PromQL expression."""
    return [_MATCHER.findall(body) for body in re.findall(rf"\b{metric}\{{([^}}]*)\}}", expr)]


def _selects(matchers: list[tuple[str, str, str]], label: str, value: str) -> bool:
    """Whether a series whose ``label`` is ``value`` passes the matchers on that label (Prometheus semantics)."""
    for name, op, pattern in matchers:
        if name != label:
            continue
        pattern = pattern.replace("\\\\", "\\")
        ok = {
            "=": value == pattern,
            "!=": value != pattern,
            "=~": re.fullmatch(pattern, value) is not None,
            "!~": re.fullmatch(pattern, value) is None,
        }[op]
        if not ok:
            return False
    return True


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _panel(title: str) -> dict[str, Any]:
    board = json.loads(OVERVIEW.read_text())
    return next(p for p in _panels(board) if p["title"] == title)


def _exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def _scrape(port: int) -> dict[str, list]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


@pytest.fixture
def emitted():
    """The ``state`` and ``cause`` label values a real run exports: a tape-trained model with an unused head, a
    frozen one declared expected, an all-zero and a NaN gradient."""
    export.shutdown()
    started = export.ensure_started(Config(prometheus_port=free_port(), run_id="vocabulary"))
    try:
        used, unused = keras.layers.Dense(2, name="used"), keras.layers.Dense(2, name="unused_head")
        frozen = keras.layers.Dense(2, name="frozen")
        x = np.ones((4, 3), "float32")
        for layer in (used, unused, frozen):
            layer(x)
        opt, other = keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0)
        gradtel.instrument(opt, name="taped", expect_missing="frozen/*")
        gradtel.instrument(other, name="crafted")
        variables = [*used.trainable_variables, *unused.trainable_variables, *frozen.trainable_variables]
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(used(x))
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        z, n = keras.Variable(np.ones(3, "float32"), name="z"), keras.Variable(np.ones(3, "float32"), name="n")
        other.apply_gradients([(tf.zeros(3), z), (tf.constant([1.0, np.nan, 0.0]), n)])
        samples = _scrape(started.endpoint[1])
        yield (
            {s.labels["state"]: s.value for s in samples["gradtel_variables"] if s.labels["optimizer"] == "taped"}
            | {
                f"crafted:{s.labels['state']}": s.value
                for s in samples["gradtel_variables"]
                if s.labels["optimizer"] == "crafted"
            },
            {
                (s.labels["variable"], s.labels["cause"], s.labels["expected"])
                for s in samples["gradtel_gradient_missing"]
                if s.name.endswith("_total")
            },
        )
        gradtel.uninstrument(opt)
        gradtel.uninstrument(other)
    finally:
        export.shutdown()


def test_the_exporter_emits_the_vocabulary_and_nothing_else(emitted) -> None:
    states, causes = emitted
    taped = {k: v for k, v in states.items() if ":" not in k}
    assert set(taped) == {str(s) for s in State}  # every state, zero or not: a stacked panel keeps its colours
    assert taped[State.OK] == 2 and taped[State.MISSING] == 2 and taped[State.EXPECTED_MISSING] == 2
    assert states[f"crafted:{State.ZERO}"] == 1 and states[f"crafted:{State.NONFINITE}"] == 1
    # The cause values are the vocabulary's (which cause is the diagnosis's business: tests/diagnosis).
    assert {(variable, expected) for variable, _, expected in causes} == {
        ("unused_head/kernel", "false"),
        ("unused_head/bias", "false"),
        ("frozen/kernel", "true"),
        ("frozen/bias", "true"),
    }
    assert {cause for _, cause, _ in causes} <= {str(c) for c in MissingCause}
    assert {c for _, c, _ in causes} <= {str(c) for c in MissingCause}


def test_dashboards_select_every_state_where_they_mean_to() -> None:
    unhealthy = [m for e in _exprs(_panel("Unhealthy variables")) for m in _selectors(e, metrics.VARIABLES.name)]
    assert unhealthy
    for matchers in unhealthy:
        assert [s for s in State if _selects(matchers, "state", s)] == list(UNHEALTHY_STATES)
    assert State.REPLICA_DISAGREEMENT in UNHEALTHY_STATES
    nonfinite = [m for e in _exprs(_panel("Non-finite variables")) for m in _selectors(e, metrics.VARIABLES.name)]
    for matchers in nonfinite:
        assert [s for s in State if _selects(matchers, "state", s)] == [State.NONFINITE]
    by_state = _panel("Variables by state")
    for matchers in (m for e in _exprs(by_state) for m in _selectors(e, metrics.VARIABLES.name)):
        assert all(_selects(matchers, "state", s) for s in State)
    colored = {o["matcher"]["options"] for o in by_state["fieldConfig"]["overrides"]}
    assert colored == {str(s) for s in State}


def test_dashboards_and_rules_leave_out_no_cause_the_exporter_emits() -> None:
    """Nothing filters on ``cause``: every missing gradient counts, ``unknown`` (not yet or not diagnosed) too."""
    board = json.loads(OVERVIEW.read_text())
    exprs = [t["expr"] for p in _panels(board) for t in p.get("targets", [])]
    exprs += [
        t["expr"]
        for path in (ROOT / "dashboards").glob("*.json")
        for p in _panels(json.loads(path.read_text()))
        for t in p.get("targets", [])
    ]
    exprs += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    selectors = [m for e in exprs for m in _selectors(e, metrics.MISSING.name)]
    assert len(selectors) > 3
    for matchers in selectors:
        assert all(_selects(matchers, "cause", c) for c in MissingCause), matchers
    assert "none" not in {str(c) for c in ALL_CAUSES}  # the old filter's value, never emitted


def test_runbooks_tabulate_exactly_the_causes() -> None:
    text = (ROOT / "docs" / "runbooks.md").read_text()
    section = text.split("## Cause categories", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert rows == [str(c) for c in ALL_CAUSES]
    listed = text.split("names the zero cause:", 1)[1].split("(table above)", 1)[0]
    assert re.findall(r"`(\w+)`", listed) == [str(c) for c in ZeroCause]  # the all-zero alert's list


def test_the_report_documentation_names_every_state_and_finding() -> None:
    text = (ROOT / "docs" / "report.md").read_text()
    missing = [str(n) for n in (*State, *Finding, *ALL_CAUSES) if f"`{n}`" not in text]
    assert not missing, f"docs/report.md does not name {missing}"


def test_members_are_their_names() -> None:
    assert json.dumps({"s": State.ZERO, "c": MissingCause.UNUSED}) == '{"s": "zero", "c": "unused"}'
    assert f"{State.REPLICA_DISAGREEMENT}" == str(State.REPLICA_DISAGREEMENT) == "replica_disagreement"
    assert {str(c) for c in ALL_CAUSES} == set(MISSING_CAUSES) | set(ZERO_CAUSES)
    assert cause("underflow") is ZeroCause.UNDERFLOW and cause("unused") is MissingCause.UNUSED
    assert fix_for("no_such_cause") == MissingCause.UNKNOWN.fix and ZeroCause.OTHER.fix == ZERO_CAUSES["other"]
    assert tuple(State) == metrics.STATES
    with pytest.raises(ValueError, match="'none' is not a gradtel cause; expected one of loss_disconnected"):
        cause("none")


def test_the_report_holds_plain_strings() -> None:
    """Members are str subclasses, but the report is handed to any serializer: YAML's safe dumper refuses them."""
    used, gone = tf.Variable([1.0, 2.0], name="used"), tf.Variable([3.0], name="gone")
    flat, bad = tf.Variable([1.0], name="flat"), tf.Variable([1.0], name="bad")
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="plain")
    try:
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(used * 2.0) + tf.reduce_sum(flat * 0.0)
            grads = tape.gradient(loss, [used, gone, flat])
            opt.apply_gradients([*zip(grads, [used, gone, flat], strict=True), (tf.constant([np.nan]), bad)])
        report = gradtel.report()
    finally:
        gradtel.uninstrument(opt)
    mine = [v for v in report["variables"] if v["optimizer"] == "plain"]
    assert {v["name"]: v["status"] for v in mine} == {
        "used": "ok",
        "gone": "missing",
        "flat": "zero",
        "bad": "nonfinite",
    }
    categories = [f["category"] for f in report["findings"]] + [v["cause"]["category"] for v in mine if v["cause"]]
    assert {"unused", "nonfinite", "nonfinite_origin"} <= set(categories)
    values = [v["status"] for v in mine] + categories
    assert all(type(value) is str for value in values)
    assert yaml.safe_load(yaml.safe_dump(report)) == json.loads(json.dumps(report))
