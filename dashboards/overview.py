"""The "gradtel / Overview" dashboard: is every run training, and are its gradients healthy?

It answers the on-call questions in order: which runs and workers report, whether they advance, how many
variables are unhealthy and why, which variables those are right now, and which gradtel alerts fire.
"""

from __future__ import annotations

from typing import Any

from dashboards import common
from gradtel import metrics
from gradtel.vocabulary import UNHEALTHY_STATES, State

UID = "gradtel-overview"
TITLE = "gradtel / Overview"
#: Template variables of this dashboard, in drop-down order (each narrows the next).
FILTERS: tuple[str, ...] = ("job", "run", "worker", "instance")
_RUN = ", ".join(common.RUN_KEY)
#: ``gradtel_variables`` series of unhealthy states (ok and expected_missing, healthy by declaration, are not).
_UNHEALTHY = f'state=~"{"|".join(UNHEALTHY_STATES)}"'
_NONFINITE = f'state="{State.NONFINITE}"'
#: gradtel's firing alerts of the selected jobs and runs. Job-level alerts carry no instance (they follow the job
#: over its restarts) and target-level ones no run: an absent label matches too.
_FIRING = 'ALERTS{alertname=~"Gradtel.+", alertstate="firing", job=~"$job", instance=~"$instance|", run=~"$run|"}'


def _unhealthy_now() -> str:
    """Variables whose gradient was missing (unexpectedly), all-zero or non-finite in the last interval."""
    problems = {
        "missing": common.share_of_steps(metrics.MISSING, FILTERS, 'expected!="true"'),
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
            "Runs reporting",
            "Training runs (run label) exporting gradtel metrics now.",
            "short",
            f"count(group by (job, run) ({variables}))",
        ),
        common.stat_panel(
            "Workers reporting",
            "Scraped training processes (job, instance) exporting gradtel metrics now.",
            "short",
            f"count(group by (job, instance) ({variables}))",
        ),
        common.stat_panel(
            "Steps per second",
            "Optimizer steps per second, summed over the selected runs (each job's workers "
            "take the same steps: counted once).",
            "ops",
            f"sum({common.per_job(common.rate(metrics.STEPS, FILTERS))})",
        ),
        common.stat_panel(
            "Unhealthy variables",
            "Variables whose latest gradient was missing (not declared expected), all-zero, non-finite or missing "
            "on some replicas only (replica_disagreement), counted once per job (its workers see the same "
            "variables).",
            "short",
            f"sum({common.per_job(common.selector(metrics.VARIABLES, FILTERS, _UNHEALTHY), 'state')})",
            common.ANY_IS_BAD,
        ),
        common.stat_panel(
            "Non-finite variables",
            "Variables whose latest gradient held NaN or Inf, counted once per job.",
            "short",
            f"sum({common.per_job(common.selector(metrics.VARIABLES, FILTERS, _NONFINITE), 'state')})",
            common.ANY_IS_BAD,
        ),
        common.stat_panel(
            "Firing gradtel alerts",
            "gradtel alerts firing now for the selected jobs (see the table below).",
            "short",
            f"count({_FIRING})",
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
            [
                common.query(
                    f"sum {common.by(common.RUN_KEY)} ({common.rate(metrics.STEPS, FILTERS)})",
                    legend="{{run}} {{optimizer}} {{instance}}",
                )
            ],
        ),
        common.timeseries_panel(
            "Global gradient norm",
            "L2 norm over all present gradients at the latest step of each run (log scale). Sudden growth "
            "precedes divergence; a collapse towards zero means the gradients vanished.",
            "none",
            [common.query(common.selector(metrics.GLOBAL_NORM, FILTERS), legend="{{run}} {{optimizer}} {{instance}}")],
            log_scale=True,
        ),
        common.timeseries_panel(
            "Skipped loss-scale steps",
            "Steps per second a LossScaleOptimizer skipped because a gradient overflowed (mixed precision), per "
            "run. A few are routine while the loss scale settles; a steady rate means the scale keeps "
            "collapsing and the model is barely updated.",
            "ops",
            [common.query(common.per_job(common.rate(metrics.SKIPPED, FILTERS)), legend="{{run}} {{optimizer}}")],
        ),
        common.timeseries_panel(
            "Phase",
            "What each process declared it is doing (train, evaluate, predict, epoch_end, checkpoint, idle), set "
            "by the Keras callback or gradtel.phase(). A run that takes no step outside train is paused, not "
            "stalled.",
            "short",
            [
                common.query(
                    f"{common.selector(metrics.PHASE, FILTERS)} == 1",
                    legend="{{phase}} {{run}} {{worker}} {{instance}}",
                )
            ],
        ),
    ]


def _variables() -> list[Any]:
    by_state = common.state_color_overrides(
        common.timeseries_panel(
            "Variables by state",
            "Trainable variables by the state of their latest gradient: ok, missing, zero (all-zero), nonfinite "
            "(NaN/Inf), expected_missing (declared with expect_missing), replica_disagreement (a gradient on some "
            "replicas, None on others).",
            "short",
            [
                common.query(
                    f"sum by (state) ({common.per_job(common.selector(metrics.VARIABLES, FILTERS), 'state')})",
                    legend="{{state}}",
                )
            ],
            stacked=True,
        )
    )
    missing = common.rate(metrics.MISSING, FILTERS, 'expected!="true"')
    return [
        by_state,
        common.timeseries_panel(
            "Missing gradients by cause",
            "Variables whose gradient was missing, by the root cause gradtel diagnosed (see "
            "docs/runbooks.md for each cause and its fix). Variables declared with expect_missing are "
            "left out.",
            "short",
            [
                common.query(
                    f"count by (cause) ({common.per_job(f'{missing} > 0', 'variable', 'cause')})", legend="{{cause}}"
                )
            ],
            stacked=True,
        ),
        common.table_panel(
            "Unhealthy variables now",
            "Variables with a missing (not expected), all-zero or non-finite gradient in the last interval, "
            "with the share of steps affected (100% = every step) and the diagnosed cause of missing ones.",
            "percentunit",
            _unhealthy_now(),
        ),
        common.runbook_links(
            common.table_panel(
                "Firing gradtel alerts",
                "gradtel alerts firing now; click an alert's name for its runbook in docs/runbooks.md.",
                "none",
                _FIRING,
            )
        ),
    ]


def build() -> dict[str, Any]:
    """The dashboard's JSON model."""
    variables = [common.label_variable(label, metrics.STEPS, FILTERS[:i]) for i, label in enumerate(FILTERS)]
    return common.build(
        UID,
        TITLE,
        "Health of every gradtel-instrumented training run: progress, gradient norms and unhealthy variables.",
        variables,
        [("Fleet", _fleet()), ("Training", _training()), ("Variables", _variables())],
    )
