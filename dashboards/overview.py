"""The "gradtel / Overview" dashboard: is every run training, and are its gradients healthy?

It answers the on-call questions in order: which runs and workers report, whether they advance, how many
variables are unhealthy and why, which variables those are right now, and which gradtel alerts fire.
"""

from __future__ import annotations

from typing import Any

from dashboards import common
from gradtel import causes, metrics

UID = "gradtel-overview"
TITLE = "gradtel / Overview"
#: Template variables of this dashboard, in drop-down order (each narrows the next).
FILTERS: tuple[str, ...] = ("job", "instance")
_RUN = ", ".join(common.RUN_KEY)
#: ``gradtel_variables`` series of unhealthy states (expected_missing is healthy by declaration).
_UNHEALTHY = 'state=~"missing|zero|nonfinite"'
_NONFINITE = 'state="nonfinite"'


def _unhealthy_now() -> str:
    """Variables whose gradient was missing (unexpectedly), all-zero or non-finite in the last interval."""
    problems = {
        "missing": common.share_of_steps(metrics.MISSING, FILTERS, 'expected!="true"',
                                         f'cause!="{causes.NO_CAUSE}"'),
        "all-zero": common.share_of_steps(metrics.ZERO, FILTERS),
        "non-finite": common.share_of_steps(metrics.NONFINITE, FILTERS),
    }
    return "\nor\n".join(
        f'label_replace(\n{expr}\n  > 0, "problem", "{name}", "", "")' for name, expr in problems.items()
    )


def _fleet() -> list[Any]:
    variables = common.selector(metrics.VARIABLES, FILTERS)
    return [
        common.stat_panel(
            "Runs reporting", "Training runs (run label) exporting gradtel metrics now.", "short",
            f"count(group by (job, run) ({variables}))",
        ),
        common.stat_panel(
            "Workers reporting", "Scraped training processes (job, instance) exporting gradtel metrics now.",
            "short", f"count(group by (job, instance) ({variables}))",
        ),
        common.stat_panel(
            "Steps per second", "Optimizer steps per second, summed over every selected run and worker.",
            "ops", f"sum({common.rate(metrics.STEPS, FILTERS)})",
        ),
        common.stat_panel(
            "Unhealthy variables",
            "Variables whose latest gradient was missing (not declared expected), all-zero or non-finite.",
            "short", f"sum({common.selector(metrics.VARIABLES, FILTERS, _UNHEALTHY)})",
            common.ANY_IS_BAD,
        ),
        common.stat_panel(
            "Non-finite variables", "Variables whose latest gradient held NaN or Inf.", "short",
            f"sum({common.selector(metrics.VARIABLES, FILTERS, _NONFINITE)})", common.ANY_IS_BAD,
        ),
        common.stat_panel(
            "Firing gradtel alerts", "gradtel alerts firing now for the selected jobs (see the table below).",
            "short",
            'count(ALERTS{alertname=~"Gradtel.+", alertstate="firing", job=~"$job", instance=~"$instance"})',
            common.ANY_IS_BAD,
        ),
    ]


def _training() -> list[Any]:
    return [
        common.timeseries_panel(
            "Steps per second",
            "Optimizer steps per second of each run. A flat zero is a stalled run; a gap is a run that "
            "stopped reporting.",
            "ops",
            [common.query(f"sum {common.by(common.RUN_KEY)} ({common.rate(metrics.STEPS, FILTERS)})",
                          legend="{{run}} {{optimizer}} {{instance}}")],
        ),
        common.timeseries_panel(
            "Global gradient norm",
            "L2 norm over all present gradients at the latest step of each run (log scale). Sudden growth "
            "precedes divergence; a collapse towards zero means the gradients vanished.",
            "none",
            [common.query(common.selector(metrics.GLOBAL_NORM, FILTERS),
                          legend="{{run}} {{optimizer}} {{instance}}")],
            log_scale=True,
        ),
    ]


def _variables() -> list[Any]:
    by_state = common.state_color_overrides(common.timeseries_panel(
        "Variables by state",
        "Trainable variables by the state of their latest gradient: ok, missing, zero (all-zero), nonfinite "
        "(NaN/Inf), expected_missing (declared with expect_missing).",
        "short",
        [common.query(f"sum by (state) ({common.selector(metrics.VARIABLES, FILTERS)})", legend="{{state}}")],
        stacked=True,
    ))
    missing = common.rate(metrics.MISSING, FILTERS, 'expected!="true"', f'cause!="{causes.NO_CAUSE}"')
    return [
        by_state,
        common.timeseries_panel(
            "Missing gradients by cause",
            "Variables whose gradient was missing, by the root cause gradtel diagnosed (see "
            "docs/runbooks.md for each cause and its fix). Variables declared with expect_missing are "
            "left out.",
            "short",
            [common.query(f"count by (cause) ({missing} > 0)", legend="{{cause}}")],
            stacked=True,
        ),
        common.table_panel(
            "Unhealthy variables now",
            "Variables with a missing (not expected), all-zero or non-finite gradient in the last interval, "
            "with the share of steps affected (100% = every step) and the diagnosed cause of missing ones.",
            "percentunit", _unhealthy_now(),
        ),
        common.table_panel(
            "Firing gradtel alerts",
            "gradtel alerts firing now; each links to its runbook in docs/runbooks.md.",
            "none",
            'ALERTS{alertname=~"Gradtel.+", alertstate="firing", job=~"$job", instance=~"$instance"}',
        ),
    ]


def build() -> dict[str, Any]:
    """The dashboard's JSON model."""
    variables = [
        common.label_variable("job", metrics.VARIABLES, ()),
        common.label_variable("instance", metrics.VARIABLES, ("job",)),
    ]
    return common.build(
        UID, TITLE,
        "Health of every gradtel-instrumented training run: progress, gradient norms and unhealthy "
        "variables.",
        variables,
        [("Fleet", _fleet()), ("Training", _training()), ("Variables", _variables())],
    )
