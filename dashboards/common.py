"""Building blocks shared by gradtel's dashboards: template variables, selectors and panel factories.

Every dashboard follows the dashboard-linter conventions (checked by tests/observability/test_dashboards.py):
a ``datasource`` template variable that every panel and variable queries through, ``job``/``instance``
multi-select variables with ``.+`` as their "All" value, units and descriptions on every panel, and
``$__rate_interval`` as the range of every rate().
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prometheus_models

from gradtel import assets, metrics
from gradtel.vocabulary import State

#: Every panel and query variable reads the Prometheus data source chosen in the ``datasource`` variable.
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Labels the scrape adds to every series: they identify the training process.
TARGET_LABELS: tuple[str, ...] = ("job", "instance")
#: Labels that identify one optimizer of one run of one process (the join key between gradtel series).
RUN_KEY: tuple[str, ...] = (*TARGET_LABELS, *metrics.COMMON_LABELS)
#: What a job-level panel keeps: the job, the run and the optimizer (the processes of a job, its workers and
#: restarts, are not added up).
JOB_KEY: tuple[str, ...] = ("job", "run", "optimizer")
#: Where each alert's runbook lives (the same page the rules' runbook_url annotations point at).
RUNBOOK_URL = assets.RUNBOOK_BASE_URL
#: Template variables whose label may be absent (``worker`` outside a multi-worker job): their "All" matches "".
OPTIONAL_LABELS: frozenset[str] = frozenset({"worker"})
#: Tags shared by gradtel dashboards; the dashboard links list every dashboard with this tag.
TAG = "gradtel"
#: Colours of the ``state`` values of ``gradtel_variables`` (Grafana's named palette).
STATE_COLORS: dict[State, str] = {
    State.OK: "green",
    State.MISSING: "orange",
    State.ZERO: "yellow",
    State.NONFINITE: "red",
    State.EXPECTED_MISSING: "blue",
    State.REPLICA_DISAGREEMENT: "purple",
}
_RATE = "$__rate_interval"


def by(labels: Sequence[str]) -> str:
    """A ``by (...)`` clause."""
    return f"by ({', '.join(labels)})"


def selector(metric: metrics.Metric, filters: Sequence[str], *extra: str) -> str:
    """``metric{...}`` filtered by the dashboard variables in ``filters`` that the metric carries.

    Template variables are named after the label they filter, so ``filters=("job", "layer")`` adds
    ``job=~"$job"`` to every metric and ``layer=~"$layer"`` only to metrics with a ``layer`` label.
    """
    carried = (*TARGET_LABELS, *metric.labels)
    matchers = [f'{name}=~"${name}"' for name in filters if name in carried]
    return f"{metric.name}{{{', '.join([*matchers, *extra])}}}"


def any_of(names: Sequence[metrics.Metric], filters: Sequence[str]) -> str:
    """A selector of several metrics at once, filtered by the dashboard variables all of them carry (a layer whose
    every variable is missing has no norm series, only missing counters: a list of layers must read both)."""
    carried = set(TARGET_LABELS).union(*(set(m.labels) for m in names))
    carried = {label for label in carried if all(label in (*TARGET_LABELS, *m.labels) for m in names)}
    matchers = [
        f'__name__=~"{"|".join(m.name for m in names)}"',
        *(f'{name}=~"${name}"' for name in filters if name in carried),
    ]
    return f"{{{', '.join(matchers)}}}"


def per_job(expr: str, *keep: str) -> str:
    """``expr`` once per job, run and optimizer (and ``keep``): the processes of a job (its workers, which all see
    the same all-reduced gradients) are not added up."""
    return f"max {by((*JOB_KEY, *keep))} ({expr})"


def rate(metric: metrics.Metric, filters: Sequence[str], *extra: str) -> str:
    """Per-second rate of a gradtel counter over Grafana's ``$__rate_interval``."""
    return f"rate({selector(metric, filters, *extra)}[{_RATE}])"


def share_of_steps(metric: metrics.Metric, filters: Sequence[str], *extra: str) -> str:
    """Fraction of optimizer steps counted by ``metric`` (1 means every step), per series of ``metric``.

    Dividing by the run's step rate makes the value independent of how fast the run trains.
    """
    return (
        f"{rate(metric, filters, *extra)}\n  / on ({', '.join(RUN_KEY)}) group_left ()\n{rate(metrics.STEPS, filters)}"
    )


def query(expr: str, ref_id: str = "A", legend: str = "", instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query; instant queries come back as a table frame (for table and stat panels)."""
    q = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(prometheus_models.PromQueryFormat.TABLE)
    return q


def datasource_variable() -> dashboard.DatasourceVariable:
    """The ``datasource`` variable every panel uses, so one JSON works against any Prometheus."""
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(
    label: str, metric: metrics.Metric | Sequence[metrics.Metric], filters: Sequence[str]
) -> dashboard.QueryVariable:
    """A multi-select variable of the values of ``label`` on ``metric`` (or on any of several metrics), narrowed
    by earlier variables. "All" is ``.+``, or ``.*`` for a label that may be absent."""
    source = selector(metric, filters) if isinstance(metric, metrics.Metric) else any_of(metric, filters)
    return (
        dashboard.QueryVariable(label)
        .label(label.replace("_", " ").title())
        .datasource(DATASOURCE)
        .query(f"label_values({source}, {label})")
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*" if label in OPTIONAL_LABELS else ".+")
    )


def regex_variable(label: str, description: str) -> dashboard.TextBoxVariable:
    """A free-text regular expression on ``label`` (variable names are too many for a drop-down)."""
    return dashboard.TextBoxVariable(label).label(f"{label.title()} regex").description(description).default_value(".+")


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(models.ThresholdsMode.ABSOLUTE)
        .steps([models.Threshold(value=value, color=color) for value, color in steps])
    )


#: Green when nothing is wrong, red from the first unhealthy variable.
ANY_IS_BAD = _thresholds((None, "green"), (1, "red"))


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    log_scale: bool = False,
    stacked: bool = False,
    width: int = 12,
) -> timeseries.Panel:
    """A time series panel; ``log_scale`` for gradient norms, which span orders of magnitude."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .targets(list(targets))
        .span(width)
        .height(8)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common_models.LegendDisplayMode.TABLE)
            .placement(common_models.LegendPlacement.RIGHT)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common_models.TooltipDisplayMode.MULTI)
            .sort(common_models.SortOrder.DESCENDING)
        )
    )
    if log_scale:
        panel = panel.scale_distribution(
            common_builders.ScaleDistributionConfig().type(common_models.ScaleDistribution.LOG).log(10)
        )
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL))
        panel = panel.fill_opacity(40)
    return panel


def stat_panel(
    title: str, description: str, unit: str, expr: str, thresholds: dashboard.ThresholdsConfig | None = None
) -> stat.Panel:
    """A single number (the latest value of ``expr``), coloured by ``thresholds`` when given."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .with_target(query(expr))
        .span(4)
        .height(4)
        .no_value("0")
        .color_mode(common_models.BigValueColorMode.BACKGROUND if thresholds else common_models.BigValueColorMode.NONE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    return panel.thresholds(thresholds) if thresholds else panel


def runbook_links(panel: table.Panel) -> table.Panel:
    """Each cell of the ``alertname`` column links to that alert's runbook section."""
    return panel.override_by_name(
        "alertname",
        [
            models.DynamicConfigValue(
                id_val="links",
                value=[
                    {
                        "title": "Runbook: ${__value.raw}",
                        "url": f"{RUNBOOK_URL}#${{__value.raw}}",
                        "targetBlank": True,
                    }
                ],
            )
        ],
    )


def table_panel(title: str, description: str, unit: str, expr: str, *, width: int = 24) -> table.Panel:
    """A table of the series ``expr`` returns now, one row per series, labels as columns."""
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .with_target(query(expr, instant=True))
        .span(width)
        .height(8)
        .no_value("none")
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "otel_scope_name": True, "otel_scope_version": True}},
            )
        )
    )


def state_timeline_panel(title: str, description: str, expr: str, legend: str) -> statetimeline.Panel:
    """One row per series over time, coloured by the share of steps that were unhealthy (0 to 1)."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit("percentunit")
        .min(0)
        .max(1)
        .with_target(query(expr, legend=legend))
        .thresholds(_thresholds((None, "green"), (0.01, "orange"), (0.99, "red")))
        .color_scheme(dashboard.FieldColor().mode(models.FieldColorModeId.THRESHOLDS))
        .show_value(common_models.VisibilityMode.NEVER)
        .merge_values(True)
        .span(24)
        .height(8)
    )


def state_color_overrides(panel: timeseries.Panel) -> timeseries.Panel:
    """Colour each ``state`` series of ``gradtel_variables`` the same way on every panel."""
    for state, color in STATE_COLORS.items():
        panel = panel.override_by_name(
            state, [models.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]
        )
    return panel


def build(
    uid: str,
    title: str,
    description: str,
    variables: Sequence[Builder[models.VariableModel]],
    rows: Sequence[tuple[str, Sequence[Builder[models.Panel]]]],
) -> dict[str, Any]:
    """Assemble a dashboard and return its JSON model, with stable panel ids (diffs stay readable)."""
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .readonly()
        .time("now-3h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("gradtel dashboards")
            .type(models.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .variables([datasource_variable(), *variables])
    )
    panel_id = 0
    for row_title, panels in rows:
        panel_id += 1
        board = board.with_row(dashboard.Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))
