"""gradtel's Prometheus alerting and recording rules, generated from the metric table (mixin style).

Every expression reads metric names from :mod:`gradtel.metrics`. The thresholds and windows live in one
:class:`Config` so that they are tuned in one place; the defaults assume the usual 15 s scrape interval and
make each alert fire within minutes of the problem without flapping on noisy gradients:

* structural problems (missing or all-zero gradients) are measured as a share of the run's own steps, so
  they do not depend on how fast the run trains, and must hold for every step over a window;
* norm problems compare the run's recent median global norm with its own median over the previous hour, so
  no fixed number has to suit every model;
* alerts carry ``job``/``instance``/``run``/``optimizer`` (and ``variable``/``layer`` for per-variable
  alerts), the labels Alertmanager groups by and the runbooks ask about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradtel import assets, metrics

#: Where the runbooks live; each alert links to its heading (GitHub anchors are the lower-cased name).
#: `gradtel assets --runbook-url` moves the links of the shipped rule files to another page.
RUNBOOK_BASE_URL = assets.RUNBOOK_BASE_URL
#: Labels Prometheus adds to every scraped series: they identify the training process.
TARGET_LABELS: tuple[str, ...] = ("job", "instance")
#: The join key between a per-variable series and its run's step counter.
RUN_KEY: tuple[str, ...] = (*TARGET_LABELS, *metrics.COMMON_LABELS)
#: The global norm without NaN/Inf samples (those have their own alert and would poison the medians).
FINITE_GLOBAL_NORM = "run:gradtel_gradient_global_norm:finite"
#: Variables declared intentionally disconnected (expect_missing) never alert.
_UNEXPECTED = 'expected!="true"'


@dataclass(frozen=True)
class Config:
    """Selectors, windows and thresholds of the rules (kubernetes-mixin's ``_config``)."""

    #: ``up`` series of gradtel targets; the shipped scrape configs all name their job ``...gradtel...``.
    target_selector: str = 'job=~".*gradtel.*"'
    #: A share of steps at or above this counts as "every step" (the margin absorbs scrape skew).
    every_step: float = 0.99
    missing_window: str = "5m"
    missing_for: str = "5m"
    zero_window: str = "10m"
    zero_for: str = "10m"
    nonfinite_window: str = "5m"
    nonfinite_for: str = "1m"
    #: The recent global norm is the median over this window...
    norm_recent: str = "5m"
    #: ...compared with the median over this window, which ends where the recent one starts.
    norm_baseline: str = "1h"
    #: A run needs this much history before its baseline is trusted (early training moves a lot).
    norm_min_history: str = "15m"
    exploding_factor: float = 10.0
    exploding_for: str = "2m"
    vanishing_factor: float = 0.01
    vanishing_for: str = "15m"
    #: Norm alerts stay firing this long after recovering, so a noisy norm does not flap them.
    norm_keep_firing: str = "10m"
    stalled_window: str = "10m"
    stalled_for: str = "5m"
    #: How far back a target must have exported gradtel metrics to count as a gradtel target when it is down.
    target_memory: str = "1h"
    target_down_for: str = "5m"
    overflow_for: str = "5m"


@dataclass(frozen=True)
class Alert:
    """One alerting rule with the annotations every gradtel alert carries."""

    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    description: str
    keep_firing_for: str | None = None

    def rule(self) -> dict[str, Any]:
        """The rule as it appears in a Prometheus rule file."""
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr, "for": self.duration}
        if self.keep_firing_for:
            rule["keep_firing_for"] = self.keep_firing_for
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": f"{RUNBOOK_BASE_URL}#{self.name.lower()}",
        }
        return rule


def _on(labels: tuple[str, ...]) -> str:
    return f"on ({', '.join(labels)})"


def _share_of_steps(metric: metrics.Metric, window: str, matchers: str = "") -> str:
    """Per series of ``metric``: the fraction of the run's steps over ``window`` that ``metric`` counted.

    0/0 (a run that did not step) is NaN and compares false, so a stalled run never looks disconnected.
    """
    selector = f"{metric.name}{{{matchers}}}" if matchers else metric.name
    return (
        f"rate({selector}[{window}])\n"
        f"  / {_on(RUN_KEY)} group_left ()\n"
        f"rate({metrics.STEPS.name}[{window}])"
    )


def _median(window: str, offset: str = "") -> str:
    shifted = f" offset {offset}" if offset else ""
    return f"quantile_over_time(0.5, {FINITE_GLOBAL_NORM}[{window}]{shifted})"


def _against_baseline(c: Config, comparison: str, factor: float) -> str:
    """The run's recent median norm compared with ``factor`` times its median before that."""
    return (
        f"{_median(c.norm_recent)}\n"
        f"  {comparison} {factor:g} * {_median(c.norm_baseline, c.norm_recent)}\n"
        f"and {FINITE_GLOBAL_NORM} offset {c.norm_min_history}"
    )


def recording_rules() -> list[dict[str, Any]]:
    """Recording rules the alerts build on."""
    return [{"record": FINITE_GLOBAL_NORM, "expr": f"{metrics.GLOBAL_NORM.name} < +Inf"}]


def alerts(c: Config = Config()) -> list[Alert]:
    """gradtel's alerts, most specific first."""
    run = ("run {{ $labels.run }} ({{ $labels.job }}/{{ $labels.instance }}, "
           "optimizer {{ $labels.optimizer }})")
    variable = "Variable {{ $labels.variable }} (layer {{ $labels.layer }}) of " + run
    every = f">= {c.every_step:g}"
    return [
        Alert(
            "GradtelVariableDisconnected",
            f"{_share_of_steps(metrics.MISSING, c.missing_window, _UNEXPECTED)}\n  {every}",
            c.missing_for, "warning",
            "A trainable variable gets no gradient: it is not training.",
            f"{variable} had no gradient (None) at every step for {c.missing_for}; diagnosed cause: "
            "{{ $labels.cause }}. The optimizer never updates it. Declare it with expect_missing if this is "
            "intended.",
        ),
        Alert(
            "GradtelGradientNonFinite",
            f"increase({metrics.NONFINITE.name}[{c.nonfinite_window}]) > 0",
            c.nonfinite_for, "critical",
            "Gradients hold NaN or Inf: the run is diverging.",
            f"{variable} had a NaN or Inf gradient in {{{{ $value | humanize }}}} steps over the last "
            f"{c.nonfinite_window}. Applying it corrupts the weights.",
        ),
        Alert(
            "GradtelGradientAllZero",
            f"{_share_of_steps(metrics.ZERO, c.zero_window)}\n  {every}",
            c.zero_for, "warning",
            "A variable's gradient is exactly zero at every step.",
            f"{variable} had an all-zero gradient at every step for {c.zero_window} or more: it is "
            "connected to the loss but does not learn (dead units, a zero-gradient op, float16 underflow).",
        ),
        Alert(
            "GradtelGradientNormExploding",
            _against_baseline(c, ">", c.exploding_factor),
            c.exploding_for, "warning",
            "The global gradient norm grew far above the run's own baseline.",
            f"The median global gradient norm of {run} over {c.norm_recent} is "
            f"{{{{ $value | humanize }}}}, more than {c.exploding_factor:g}x its median over the "
            f"{c.norm_baseline} before. The run is likely to diverge.",
            keep_firing_for=c.norm_keep_firing,
        ),
        Alert(
            "GradtelGradientNormVanishing",
            _against_baseline(c, "<", c.vanishing_factor),
            c.vanishing_for, "warning",
            "The global gradient norm collapsed far below the run's own baseline.",
            f"The median global gradient norm of {run} over {c.norm_recent} is "
            f"{{{{ $value | humanize }}}}, less than {c.vanishing_factor:g}x its median over the "
            f"{c.norm_baseline} before. Training has all but stopped learning.",
            keep_firing_for=c.norm_keep_firing,
        ),
        Alert(
            "GradtelStepsStalled",
            f"increase({metrics.STEPS.name}[{c.stalled_window}]) == 0",
            c.stalled_for, "warning",
            "A training run stopped taking optimizer steps.",
            f"{run} took no optimizer step for {c.stalled_window} while its process still serves metrics: "
            "it is hung (input pipeline, collective, deadlock) or stuck outside the training loop.",
        ),
        Alert(
            "GradtelTargetDown",
            f"up{{{c.target_selector}}} == 0\n"
            f"or\n"
            f"up == 0 and {_on(TARGET_LABELS)}\n"
            f"  group by ({', '.join(TARGET_LABELS)})"
            f" (last_over_time({metrics.STEPS.name}[{c.target_memory}]))",
            c.target_down_for, "warning",
            "Prometheus cannot scrape a gradtel training process.",
            "{{ $labels.job }}/{{ $labels.instance }} failed every scrape for "
            f"{c.target_down_for}: the process died or hangs, or its metrics endpoint is not reachable "
            "(OTEL_EXPORTER_PROMETHEUS_HOST must be 0.0.0.0 in containers).",
        ),
        Alert(
            "GradtelMetricsOverflow",
            f'count by ({", ".join(TARGET_LABELS)}) ({{__name__=~"gradtel_.+", otel_metric_overflow="true"}})'
            " > 0",
            c.overflow_for, "warning",
            "gradtel hit its series limit: some variables' metrics are folded together.",
            "{{ $labels.job }}/{{ $labels.instance }}: {{ $value }} gradtel metrics exceeded the "
            "OpenTelemetry cardinality limit, so their extra series are folded into one "
            "otel_metric_overflow=\"true\" series and some variables have no series of their own. Raise "
            "GRADTEL_MAX_SERIES.",
        ),
    ]


def rule_groups(c: Config = Config()) -> list[dict[str, Any]]:
    """The ``groups`` of the rule file (and of the PrometheusRule's spec)."""
    return [
        {"name": "gradtel.rules", "rules": recording_rules()},
        {"name": "gradtel.alerts", "rules": [alert.rule() for alert in alerts(c)]},
    ]
