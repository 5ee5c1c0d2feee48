"""The "gradtel / Variables" dashboard: drill down from a run to its layers and variables.

Filters narrow from job to variable (a regular expression, since models have thousands of variables); the
panels show each variable's gradient norm over time and when its gradient was missing, all-zero or non-finite.
"""

from __future__ import annotations

from typing import Any

from dashboards import common
from gradtel import metrics

UID = "gradtel-variables"
TITLE = "gradtel / Variables"
#: Template variables of this dashboard, in drop-down order (each narrows the next).
FILTERS: tuple[str, ...] = ("job", "instance", "run", "worker", "optimizer", "layer", "variable")
#: The layer list reads every per-variable metric: a broken layer (every variable missing) has no norm series.
_LAYER_SOURCES = (metrics.NORM, metrics.MISSING, metrics.ZERO, metrics.NONFINITE)
_LAYER_KEY = (*common.RUN_KEY, "layer")
_LEGEND = "{{variable}} {{run}} {{instance}}"


def _norms() -> list[Any]:
    finite_norm = f"({common.selector(metrics.NORM, FILTERS)} < +Inf)"
    return [
        common.timeseries_panel(
            "Gradient norm by variable",
            "L2 norm of each variable's gradient at the latest step (log scale). Gaps are steps whose "
            "gradient was missing or non-finite.",
            "none",
            [common.query(common.selector(metrics.NORM, FILTERS), legend=_LEGEND)],
            log_scale=True,
        ),
        common.timeseries_panel(
            "Largest gradient element by variable",
            "Largest absolute element of each variable's gradient at the latest step (log scale): one huge "
            "element with a modest norm points at a single unstable unit. Measured only when the job sets "
            "GRADTEL_MAX_ABS=true (or instrument(max_abs=True)); empty otherwise.",
            "none",
            [common.query(common.selector(metrics.MAX_ABS, FILTERS), legend=_LEGEND)],
            log_scale=True,
        ),
        common.timeseries_panel(
            "Gradient norm by layer",
            "L2 norm of each layer's gradients (the root of the sum of its variables' squared norms), over "
            "variables with a finite gradient (log scale).",
            "none",
            [
                common.query(
                    f"sqrt(sum {common.by(_LAYER_KEY)} ({finite_norm} ^ 2))", legend="{{layer}} {{run}} {{instance}}"
                )
            ],
            log_scale=True,
            width=24,
        ),
    ]


def _states() -> list[Any]:
    return [
        common.state_timeline_panel(
            "Missing gradients",
            "Variables whose gradient was missing (None), coloured by the share of steps (red: every step). "
            "The legend names the diagnosed cause and whether the variable was declared with expect_missing. "
            "Only variables with missing gradients appear.",
            f"{common.share_of_steps(metrics.MISSING, FILTERS)} > 0",
            "{{variable}} {{run}} cause={{cause}} expected={{expected}}",
        ),
        common.state_timeline_panel(
            "All-zero gradients",
            "Variables whose gradient was exactly zero, coloured by the share of steps (red: every step). "
            "Only variables with all-zero gradients appear.",
            f"{common.share_of_steps(metrics.ZERO, FILTERS)} > 0",
            _LEGEND,
        ),
        common.state_timeline_panel(
            "Non-finite gradients",
            "Variables whose gradient held NaN or Inf, coloured by the share of steps (red: every step). "
            "Only variables with non-finite gradients appear.",
            f"{common.share_of_steps(metrics.NONFINITE, FILTERS)} > 0",
            _LEGEND,
        ),
    ]


def build() -> dict[str, Any]:
    """The dashboard's JSON model."""
    variables = [
        common.label_variable(label, _LAYER_SOURCES if label == "layer" else metrics.STEPS, FILTERS[:i])
        for i, label in enumerate(FILTERS[:-1])
    ]
    variables.append(
        common.regex_variable(
            "variable",
            "Regular expression on the variable name, for example .*kernel or dense_1/.*",
        )
    )
    return common.build(
        UID,
        TITLE,
        "Per-layer and per-variable gradient telemetry of gradtel-instrumented runs.",
        variables,
        [("Gradient norms", _norms()), ("Unhealthy gradients", _states())],
    )
