"""dashboard-linter's rules, enforced on the committed dashboard JSON (the Go linter is not installable here).

Rules checked (names as in grafana/dashboard-linter): template-datasource, template-job, template-instance,
template-on-time-change-reload, panel-datasource, panel-title-description, panel-units, panel-no-targets,
target-rate-interval, target-job, target-instance, target-counter-agg, uneditable-dashboard; plus gradtel's
own: every metric and label a query names exists in gradtel.metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from gradtel import metrics

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "dashboards").glob("*.json"))
#: The Grafana unit ids gradtel's panels may use (a subset of Grafana's valueFormats).
UNITS = {"none", "short", "percentunit", "ops"}
_QUERY_PANELS = {"timeseries", "stat", "table", "state-timeline"}
_SELECTOR = re.compile(r"\b(gradtel_\w+|up|ALERTS)\b(?:\{([^}]*)\})?")
_RANGE = re.compile(r"\[([^\]]+)\]")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KNOWN_LABELS = {"job", "instance", *(label for m in metrics.ALL for label in m.labels)}
_METRICS = {m.name: m for m in metrics.ALL}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(board) for t in p.get("targets", [])]


def _variable(board: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [v for v in board["templating"]["list"] if v["name"] == name]
    assert matches, f"{board['title']}: no '{name}' template variable"
    return matches[0]


@pytest.fixture(params=DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def board(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _load(request.param)


def test_both_dashboards_exist() -> None:
    titles = {_load(path)["title"] for path in DASHBOARDS}
    assert titles == {"gradtel / Overview", "gradtel / Variables"}


def test_template_datasource(board: dict[str, Any]) -> None:
    variable = _variable(board, "datasource")
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"


@pytest.mark.parametrize("name", ["job", "instance"])
def test_template_job_and_instance(board: dict[str, Any], name: str) -> None:
    variable = _variable(board, name)
    assert variable["type"] == "query"
    assert variable["datasource"]["uid"] == "${datasource}"
    assert variable["label"] == name.title()
    assert variable["multi"] is True and variable["allValue"] == ".+"


def test_query_variables_reload_on_time_change(board: dict[str, Any]) -> None:
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["refresh"] == 2, variable["name"]
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]


def test_dashboard_is_uneditable_and_tagged(board: dict[str, Any]) -> None:
    assert board["editable"] is False
    assert "gradtel" in board["tags"] and board["uid"].startswith("gradtel-")


def test_panels_use_the_datasource_variable(board: dict[str, Any]) -> None:
    for panel in _panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panels_have_title_description_unit_and_targets(board: dict[str, Any]) -> None:
    for panel in _panels(board):
        assert panel["type"] in _QUERY_PANELS, panel["title"]
        assert panel.get("title") and len(panel.get("description", "")) > 20, panel.get("title")
        assert panel["fieldConfig"]["defaults"].get("unit") in UNITS, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), panel["title"]


def test_panel_ids_are_unique(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids) and 0 not in ids


def test_ranges_use_rate_interval(board: dict[str, Any]) -> None:
    for title, expr in _targets(board):
        for window in _RANGE.findall(expr):
            assert window == "$__rate_interval", f"{title}: [{window}] in {expr}"


def test_every_selector_filters_job_and_instance(board: dict[str, Any]) -> None:
    """ALERTS may lack the instance (job-level alerts follow the job over its restarts): "$instance or none"."""
    for title, expr in _targets(board):
        for name, matchers in _SELECTOR.findall(expr):
            instance = 'instance=~"$instance|"' if name == "ALERTS" else 'instance=~"$instance"'
            assert 'job=~"$job"' in matchers and instance in matchers, f"{title}: {name}"


def test_every_dashboard_filters_run_and_worker(board: dict[str, Any]) -> None:
    for name in ("run", "worker"):
        variable = _variable(board, name)
        assert variable["type"] == "query" and variable["multi"] is True
    # worker is absent outside a multi-worker job: its "All" must match the empty value too.
    assert _variable(board, "worker")["allValue"] == ".*"
    for title, expr in _targets(board):
        for name, matchers in _SELECTOR.findall(expr):
            if name.startswith("gradtel_"):
                assert 'run=~"$run"' in matchers and 'worker=~"$worker"' in matchers, f"{title}: {name}"


def test_the_layer_list_includes_layers_whose_every_variable_is_missing() -> None:
    board = next(_load(path) for path in DASHBOARDS if path.name == "gradtel-variables.json")
    query = _variable(board, "layer")["query"]
    assert "gradtel_gradient_missing_total" in query and "gradtel_gradient_norm" in query


def test_job_level_counts_take_each_job_once_and_skipped_steps_have_a_panel() -> None:
    board = next(_load(path) for path in DASHBOARDS if path.name == "gradtel-overview.json")
    exprs = dict(_targets(board))
    assert exprs["Unhealthy variables"].startswith("sum(max by (job, run, optimizer, state) (gradtel_variables")
    assert any("gradtel_loss_scale_skipped_steps_total" in expr for expr in exprs.values())
    table = next(p for p in _panels(board) if p["title"] == "Firing gradtel alerts" and p["type"] == "table")
    links = [prop for o in table["fieldConfig"]["overrides"] for prop in o["properties"] if prop["id"] == "links"]
    assert links and links[0]["value"][0]["url"].endswith("runbooks.md#${__value.raw}")


def test_counters_are_only_read_through_rate_or_increase(board: dict[str, Any]) -> None:
    for title, expr in _targets(board):
        for match in re.finditer(r"gradtel_\w+_total", expr):
            before = expr[: match.start()]
            assert re.search(r"\b(rate|irate|increase)\($", before), f"{title}: bare counter in {expr}"


def test_queries_name_only_gradtel_metrics_and_their_labels(board: dict[str, Any]) -> None:
    for title, expr in _targets(board):
        for name, matchers in _SELECTOR.findall(expr):
            if name.startswith("gradtel_"):
                assert name in _METRICS, f"{title}: unknown metric {name}"
                allowed = {"job", "instance", *_METRICS[name].labels}
                for label, _op in _MATCHER.findall(matchers):
                    assert label in allowed, f"{title}: {name} has no label {label}"
        for labels in _LABEL_LISTS.findall(expr):
            for label in filter(None, (part.strip() for part in labels.split(","))):
                assert label in _KNOWN_LABELS, f"{title}: unknown label {label}"


def test_variables_dashboard_filters_down_to_the_variable() -> None:
    board = next(_load(path) for path in DASHBOARDS if path.name == "gradtel-variables.json")
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "run", "worker", "optimizer", "layer", "variable"]
    assert _variable(board, "variable")["type"] == "textbox"
