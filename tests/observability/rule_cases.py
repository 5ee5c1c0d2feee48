"""promtool unit-test cases for gradtel's alerts: each alert fires on its problem and stays quiet otherwise.

Cases are Python data so that the expected annotations are rendered from the same templates the rule file
ships (promtool compares annotations exactly) and so that a test can check every alert has both a firing
and a quiet case. Series use the real metric names from gradtel.metrics and a 15 s scrape interval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from deploy import alerts
from gradtel import metrics

INTERVAL = "15s"
RUN = {"job": "gradtel", "instance": "trainer:9464", "run": "r1", "optimizer": "adam"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    """One promtool input series."""
    inner = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def variable(name: str, layer: str, **extra: str) -> dict[str, str]:
    """Labels of a per-variable series of the default run."""
    return {**RUN, "variable": name, "layer": layer, **extra}


@dataclass(frozen=True)
class Case:
    """Input series and, at ``eval_time``, the alerts expected (none: the alert must stay quiet)."""

    name: str
    alert: str
    eval_time: str
    input_series: list[dict[str, str]]
    expected: list[dict[str, str]] = field(default_factory=list)
    #: ``$value`` as the annotation templates print it (only for alerts whose annotations show it).
    value: str = ""


_STEADY = series(metrics.STEPS.name, RUN, "0+10x120")
_HEAD = variable("head/kernel", "head", cause="unused", expected="false")
_AUX = variable("aux/kernel", "aux", cause="not_on_loss_path", expected="true")
_GATE = variable("gate/kernel", "gate", cause="stop_gradient", expected="false")
_DENSE = variable("dense/kernel", "dense")
_BIAS = variable("dense/bias", "dense")

CASES: list[Case] = [
    Case("missing at every step fires; expected-missing and partly missing variables do not",
         "GradtelVariableDisconnected", "12m",
         [_STEADY,
          series(metrics.MISSING.name, _HEAD, "0+10x120"),
          series(metrics.MISSING.name, _AUX, "0+10x120"),
          series(metrics.MISSING.name, _GATE, "0+5x120")],
         [_HEAD]),
    Case("missing at every step does not fire before its for: duration",
         "GradtelVariableDisconnected", "4m",
         [_STEADY, series(metrics.MISSING.name, _HEAD, "0+10x120")]),
    Case("a stalled run's missing variables are not reported as disconnected",
         "GradtelVariableDisconnected", "12m",
         [series(metrics.STEPS.name, RUN, "100x120"), series(metrics.MISSING.name, _HEAD, "50x120")]),
    Case("a NaN gradient fires while it is recent", "GradtelGradientNonFinite", "7m",
         [_STEADY, series(metrics.NONFINITE.name, _DENSE, "0x20 0+1x10 10x90"),
          series(metrics.NONFINITE.name, _BIAS, "0x120")],
         [_DENSE], value="7"),
    Case("a NaN gradient no longer fires once no new one came for the window", "GradtelGradientNonFinite",
         "20m",
         [_STEADY, series(metrics.NONFINITE.name, _DENSE, "0x20 0+1x10 10x90")]),
    Case("an all-zero gradient at every step fires after its window", "GradtelGradientAllZero", "22m",
         [_STEADY, series(metrics.ZERO.name, _DENSE, "0+10x120"),
          series(metrics.ZERO.name, _BIAS, "0+9x120")],
         [_DENSE]),
    Case("an all-zero gradient does not fire before its for: duration", "GradtelGradientAllZero", "8m",
         [_STEADY, series(metrics.ZERO.name, _DENSE, "0+10x120")]),
    Case("a 20x jump of the global norm fires", "GradtelGradientNormExploding", "31m",
         [series(metrics.GLOBAL_NORM.name, RUN, "1x100 20x40")],
         [RUN], value="20"),
    Case("a 3x rise with NaN steps does not fire", "GradtelGradientNormExploding", "31m",
         [series(metrics.GLOBAL_NORM.name, RUN, "1x50 NaN 1x49 3x40")]),
    Case("a young run has no baseline yet", "GradtelGradientNormExploding", "20m",
         [series(metrics.GLOBAL_NORM.name, RUN, "_x40 1x10 20x40")]),
    Case("a 1000x collapse of the global norm fires", "GradtelGradientNormVanishing", "47m",
         [series(metrics.GLOBAL_NORM.name, RUN, "1x100 0.001x100")],
         [RUN], value="1m"),
    Case("a collapse does not fire before its for: duration", "GradtelGradientNormVanishing", "35m",
         [series(metrics.GLOBAL_NORM.name, RUN, "1x100 0.001x100")]),
    Case("a 20x decrease (ordinary decay) does not fire", "GradtelGradientNormVanishing", "47m",
         [series(metrics.GLOBAL_NORM.name, RUN, "1x100 0.05x100")]),
    Case("a run whose step counter stopped fires", "GradtelStepsStalled", "26m",
         [series(metrics.STEPS.name, RUN, "0+10x40 400x80"),
          series(metrics.STEPS.name, {**RUN, "run": "r2"}, "0+10x120")],
         [RUN]),
    Case("a stalled run does not fire before window and for: elapse", "GradtelStepsStalled", "18m",
         [series(metrics.STEPS.name, RUN, "0+10x40 400x80")]),
    Case("down gradtel targets fire, by job name or by the gradtel metrics they exported",
         "GradtelTargetDown", "12m",
         [series("up", {"job": "gradtel", "instance": "trainer:9464"}, "1x20 0x40"),
          series("up", {"job": "trainer", "instance": "custom:9464"}, "1x20 0x40"),
          series(metrics.STEPS.name, {**RUN, "job": "trainer", "instance": "custom:9464"}, "0+1x20"),
          series("up", {"job": "node", "instance": "node:9100"}, "0x60")],
         [{"job": "gradtel", "instance": "trainer:9464"}, {"job": "trainer", "instance": "custom:9464"}]),
    Case("a target down for less than its for: duration does not fire", "GradtelTargetDown", "8m",
         [series("up", {"job": "gradtel", "instance": "trainer:9464"}, "1x20 0x40")]),
    Case("series folded by the cardinality limit fire", "GradtelMetricsOverflow", "6m",
         [series(metrics.NORM.name, {**RUN, "otel_metric_overflow": "true"}, "1x40"),
          series(metrics.NORM.name, _DENSE, "1x40")],
         [{"job": "gradtel", "instance": "trainer:9464"}], value="1"),
    Case("no overflow series, no alert", "GradtelMetricsOverflow", "6m",
         [series(metrics.NORM.name, _DENSE, "1x40")]),
]

_LABEL = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")
_VALUE = re.compile(r"\{\{\s*\$value(?:\s*\|\s*humanize)?\s*\}\}")


def render(template: str, labels: dict[str, str], value: str) -> str:
    """Expand the two template forms gradtel's annotations use: ``$labels.x`` and ``$value``."""
    text = _VALUE.sub(value, _LABEL.sub(lambda m: labels.get(m.group(1), ""), template))
    if "{{" in text:
        raise ValueError(f"unsupported template syntax left in {text!r}")
    return text


def promtool_tests(rule_file: str) -> dict[str, Any]:
    """The promtool test file for all cases."""
    rules = {alert.name: alert.rule() for alert in alerts.alerts()}
    tests = []
    for case in CASES:
        rule = rules[case.alert]
        exp_alerts = [
            {
                "exp_labels": {**labels, **rule["labels"]},
                "exp_annotations": {key: render(text, labels, case.value)
                                    for key, text in rule["annotations"].items()},
            }
            for labels in case.expected
        ]
        tests.append({
            "name": case.name,
            "interval": INTERVAL,
            "input_series": case.input_series,
            "alert_rule_test": [
                {"eval_time": case.eval_time, "alertname": case.alert, "exp_alerts": exp_alerts},
            ],
        })
    return {"rule_files": [rule_file], "evaluation_interval": INTERVAL, "tests": tests}
