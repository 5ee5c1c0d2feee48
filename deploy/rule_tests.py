"""promtool unit tests of gradtel's rules, written to deploy/prometheus/tests/*.yml by ``python -m deploy.generate``.

One file per scenario of a job's life (``promtool test rules deploy/prometheus/tests/*.yml`` runs them all): the
basic firing and quiet case of every alert, then restarts from scratch and from a checkpoint, a crash loop, a
pause, sporadic NaNs, several workers and expected-missing variables. Cases are Python data so that the expected
annotations are rendered from the same templates the rule file ships (promtool compares annotations exactly).
Series use the real metric names from gradtel.metrics and a 15 s scrape interval; a process that dies leaves a
staleness marker, as a failed scrape does in Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deploy import alerts
from gradtel import metrics
from gradtel.vocabulary import MissingCause

INTERVAL = "15s"
#: Where the test files are, relative to the rule file (promtool resolves rule_files against the test file).
RULE_FILE = "../gradtel-rules.yml"
#: One process of the default run: the scrape labels plus the run (no worker: a single-worker job).
PROCESS = {"job": "gradtel", "instance": "trainer:9464", "run": "r1"}
RUN = {**PROCESS, "optimizer": "adam"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    """One promtool input series."""
    inner = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def variable(name: str, layer: str, base: dict[str, str] = RUN, **extra: str) -> dict[str, str]:
    """Labels of a per-variable series."""
    return {**base, "variable": name, "layer": layer, **extra}


def alert_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels of a job-level alert raised from series with ``labels``: process labels and worker dropped."""
    return {k: v for k, v in labels.items() if k not in (*alerts.Config().process_labels, "worker")}


def segments(*parts: tuple[str, int]) -> str:
    """promtool values from (value expression, samples) parts: ``("0+10", 40)`` is 40 samples 0, 10, ... 390;
    ``("stale", 1)`` a staleness marker, ``("_", 2)`` two missing samples."""
    out = []
    for value, count in parts:
        if value in ("stale", "_"):
            out += [value] * count
        elif count == 1:
            out.append(value.split("+")[0])
        else:
            out.append(f"{value}x{count - 1}")
    return " ".join(out)


@dataclass(frozen=True)
class Check:
    """At ``eval_time``, ``alert`` fires exactly for ``expected`` (none: it must stay quiet)."""

    alert: str
    eval_time: str
    expected: list[dict[str, str]] = field(default_factory=list)
    #: ``$value`` as the annotation templates print it (only for alerts whose annotations show it).
    value: str = ""
    #: Where a NaN began as the NonFinite alert says it (step, variable, layer); None: not known.
    origin: tuple[int, str, str] | None = None


@dataclass(frozen=True)
class Case:
    """Input series and the checks made on them."""

    name: str
    input_series: list[dict[str, str]]
    checks: list[Check]


def quiet(alert_names: Iterable[str], *times: str) -> list[Check]:
    """Every alert in ``alert_names`` quiet at every one of ``times``."""
    return [Check(name, t) for name in alert_names for t in times]


DISCONNECTED = "GradtelVariableDisconnected"
NONFINITE = "GradtelGradientNonFinite"
ALL_ZERO = "GradtelGradientAllZero"
EXPLODING = "GradtelGradientNormExploding"
VANISHING = "GradtelGradientNormVanishing"
STALLED = "GradtelStepsStalled"
CRASH_LOOPING = "GradtelCrashLooping"
TARGET_DOWN = "GradtelTargetDown"
OVERFLOW = "GradtelMetricsOverflow"
#: Alerts that say something about the run itself, and must stay quiet over a healthy restart.
RUN_ALERTS = (EXPLODING, VANISHING, STALLED, CRASH_LOOPING, TARGET_DOWN)

_STEADY = series(metrics.STEPS.name, RUN, "0+10x120")
_STARTED = series(metrics.PROCESS_START.name, PROCESS, "0x480")
_HEAD = variable("head/kernel", "head", cause=MissingCause.UNUSED, expected="false")
_AUX = variable("aux/kernel", "aux", cause=MissingCause.NOT_ON_LOSS_PATH, expected="true")
_GATE = variable("gate/kernel", "gate", cause=MissingCause.STOP_GRADIENT, expected="false")
_DENSE = variable("dense/kernel", "dense")
_BIAS = variable("dense/bias", "dense")
_JOB = alert_labels(RUN)
_TARGET = {"job": "gradtel", "instance": "trainer:9464"}

BASICS: list[Case] = [
    Case(
        "missing at every step fires within 2 minutes; expected-missing and partly missing variables do not",
        [
            series(metrics.STEPS.name, RUN, "10+10x120"),
            series(metrics.MISSING.name, _HEAD, "10+10x120"),
            series(metrics.MISSING.name, _AUX, "10+10x120"),
            series(metrics.MISSING.name, _GATE, "5+5x120"),
        ],
        [Check(DISCONNECTED, "2m", [alert_labels(_HEAD)]), Check(DISCONNECTED, "45s")],
    ),
    Case(
        "a stalled run's missing variables are not reported as disconnected",
        [series(metrics.STEPS.name, RUN, "100x120"), series(metrics.MISSING.name, _HEAD, "50x120")],
        [Check(DISCONNECTED, "12m")],
    ),
    Case(
        "a NaN gradient fires while it is recent, and stops once none came for the window and keep_firing_for",
        [
            series(metrics.STEPS.name, RUN, "0+10x240"),
            series(metrics.NONFINITE.name, _DENSE, "0x20 0+1x10 10x210"),
            series(metrics.NONFINITE.name, _BIAS, "0x240"),
        ],
        [Check(NONFINITE, "7m", [alert_labels(_DENSE)], value="7"), Check(NONFINITE, "50m")],
    ),
    Case(
        "the NaN alert says where the NaN began: the origin variable and its step, from gradtel_nonfinite_origin_step",
        [
            series(metrics.STEPS.name, RUN, "0+10x240"),
            series(metrics.NONFINITE.name, _DENSE, "0x20 0+1x10 10x210"),
            series(metrics.NONFINITE_ORIGIN.name, _DENSE, "_x20 201x220"),
        ],
        [Check(NONFINITE, "7m", [alert_labels(_DENSE)], value="7", origin=(201, "dense/kernel", "dense"))],
    ),
    Case(
        "an all-zero gradient at every step fires after its window, not before its for: duration",
        [_STEADY, series(metrics.ZERO.name, _DENSE, "0+10x120"), series(metrics.ZERO.name, _BIAS, "0+9x120")],
        [Check(ALL_ZERO, "22m", [alert_labels(_DENSE)]), Check(ALL_ZERO, "8m")],
    ),
    Case(
        "a 20x jump of the global norm fires",
        [_STARTED, series(metrics.GLOBAL_NORM.name, RUN, "1x100 20x40")],
        [Check(EXPLODING, "31m", [_JOB], value="20")],
    ),
    Case(
        "a 3x rise with NaN steps does not fire",
        [_STARTED, series(metrics.GLOBAL_NORM.name, RUN, "1x50 NaN 1x49 3x40")],
        [Check(EXPLODING, "31m")],
    ),
    Case(
        "a young run has no baseline yet",
        [_STARTED, series(metrics.GLOBAL_NORM.name, RUN, "_x40 1x10 20x40")],
        [Check(EXPLODING, "20m")],
    ),
    Case(
        "a 1000x collapse of the global norm fires, not before its for: duration",
        [_STARTED, series(metrics.GLOBAL_NORM.name, RUN, "1x100 0.001x100")],
        [Check(VANISHING, "47m", [_JOB], value="1m"), Check(VANISHING, "35m")],
    ),
    Case(
        "a 20x decrease (ordinary decay) does not fire",
        [_STARTED, series(metrics.GLOBAL_NORM.name, RUN, "1x100 0.05x100")],
        [Check(VANISHING, "47m")],
    ),
    Case(
        "a run whose step counter stopped fires, after window and for: elapse",
        [
            _STARTED,
            series(metrics.STEPS.name, RUN, "0+10x40 400x80"),
            series(metrics.STEPS.name, {**RUN, "run": "r2"}, "0+10x120"),
            series(metrics.PROCESS_START.name, {**PROCESS, "run": "r2"}, "0x120"),
        ],
        [Check(STALLED, "26m", [_JOB]), Check(STALLED, "18m")],
    ),
    Case(
        "down gradtel targets fire, by job name or by the gradtel metrics they exported",
        [
            series("up", _TARGET, "1x20 0x40"),
            series("up", {"job": "trainer", "instance": "custom:9464"}, "1x20 0x40"),
            series(metrics.STEPS.name, {**RUN, "job": "trainer", "instance": "custom:9464"}, "0+1x20"),
            series("up", {"job": "node", "instance": "node:9100"}, "0x60"),
        ],
        [Check(TARGET_DOWN, "12m", [_TARGET, {"job": "trainer", "instance": "custom:9464"}])],
    ),
    Case(
        "a target down for less than its for: duration does not fire",
        [series("up", _TARGET, "1x20 0x40")],
        [Check(TARGET_DOWN, "8m")],
    ),
    Case(
        "series folded by the cardinality limit fire",
        [
            series(metrics.NORM.name, {**RUN, "otel_metric_overflow": "true"}, "1x40"),
            series(metrics.NORM.name, _DENSE, "1x40"),
        ],
        [Check(OVERFLOW, "6m", [_TARGET], value="1")],
    ),
    Case("no overflow series, no alert", [series(metrics.NORM.name, _DENSE, "1x40")], [Check(OVERFLOW, "6m")]),
]

# A job restarted at 120m: the first process stepped for 2 hours, its last scrape fails (a staleness marker), and
# the second process, on the same address with the same run id, is scraped from 120m45s on.
_BEFORE, _DOWN, _AFTER_START_S = 481, 2, 483 * 15


def _restarted(before: str, after: tuple[str, int] | list[tuple[str, int]], after_count: int = 240) -> str:
    """Values of a series of the restarted job: ``before`` for the first process, then ``after``."""
    tail = after if isinstance(after, list) else [(after[0], after_count)]
    return segments((before, _BEFORE), ("stale", 1), ("_", _DOWN - 1), *tail)


_RESTART_COMMON = [
    series(metrics.STEPS.name, RUN, _restarted("0+10", ("0+10", 240))),
    series(metrics.PROCESS_START.name, PROCESS, _restarted("0", (str(_AFTER_START_S), 240))),
    series("up", _TARGET, segments(("1", _BEFORE), ("0", _DOWN), ("1", 240))),
]
_RESTART_TIMES = ("121m", "124m", "126m", "128m", "130m", "135m", "140m", "150m", "165m", "180m")

RESTART_FROM_SCRATCH: list[Case] = [
    Case(
        "a restart from scratch (early norms 40x the finished run's) raises no run alert",
        [
            *_RESTART_COMMON,
            series(
                metrics.GLOBAL_NORM.name,
                RUN,
                _restarted("0.5", [("20", 40), ("10", 40), ("5", 40), ("2", 40), ("1", 40), ("0.5", 40)]),
            ),
        ],
        quiet(RUN_ALERTS, *_RESTART_TIMES),
    ),
    Case(
        "after a restart, the new process's own explosion still fires",
        [
            *_RESTART_COMMON,
            series(metrics.GLOBAL_NORM.name, RUN, _restarted("0.5", [("20", 40), ("1", 120), ("30", 80)])),
        ],
        [Check(EXPLODING, "176m", [_JOB], value="30"), *quiet((EXPLODING,), "150m", "160m")],
    ),
]

_POD_B = {**PROCESS, "instance": "trainer-b:9464"}
RESTART_FROM_CHECKPOINT: list[Case] = [
    Case(
        "a restart from a checkpoint at the same address with a 15x transient raises no run alert",
        [*_RESTART_COMMON, series(metrics.GLOBAL_NORM.name, RUN, _restarted("1", [("15", 32), ("1", 208)]))],
        quiet(RUN_ALERTS, *_RESTART_TIMES),
    ),
    Case(
        "a re-created pod restoring a checkpoint for 8 minutes is not stalled and the old pod alerts nothing",
        [
            series(metrics.STEPS.name, RUN, segments(("0+10", _BEFORE), ("stale", 1))),
            series(metrics.PROCESS_START.name, PROCESS, segments(("0", _BEFORE), ("stale", 1))),
            series(metrics.GLOBAL_NORM.name, RUN, segments(("1", _BEFORE), ("stale", 1))),
            series("up", _TARGET, segments(("1", _BEFORE), ("stale", 1))),
            series(
                metrics.STEPS.name,
                {**_POD_B, "optimizer": "adam"},
                segments(("_", _BEFORE + _DOWN), ("0", 32), ("0+10", 208)),
            ),
            series(metrics.PROCESS_START.name, _POD_B, segments(("_", _BEFORE + _DOWN), (str(_AFTER_START_S), 240))),
            series(
                metrics.GLOBAL_NORM.name,
                {**_POD_B, "optimizer": "adam"},
                segments(("_", _BEFORE + _DOWN + 32), ("1", 208)),
            ),
            series("up", {**_TARGET, "instance": "trainer-b:9464"}, segments(("_", _BEFORE + _DOWN), ("1", 240))),
        ],
        quiet(RUN_ALERTS, *_RESTART_TIMES),
    ),
]


def _cycles(up: int, down: int, count: int, value: str) -> list[tuple[str, int]]:
    """A process up for ``up`` samples then down for ``down``, ``count`` times; ``value`` may use ``{start}``
    (the cycle's start time in seconds)."""
    parts: list[tuple[str, int]] = []
    for k in range(count):
        parts += [(value.format(start=k * (up + down) * 15), up), ("stale", 1), ("_", down - 1)]
    return parts


# Up 4.5 minutes, down 30 seconds, eight times.
_LOOP = {"up": 18, "down": 2, "count": 8}
CRASH_LOOP: list[Case] = [
    Case(
        "up 4.5 minutes and down 30 seconds, again and again, is a crash loop (and neither down nor stalled)",
        [
            series(metrics.STEPS.name, RUN, segments(*_cycles(**_LOOP, value="0+10"))),
            series(metrics.PROCESS_START.name, PROCESS, segments(*_cycles(**_LOOP, value="{start}"))),
            series("up", _TARGET, segments(*[("1", _LOOP["up"]), ("0", _LOOP["down"])] * _LOOP["count"])),
        ],
        [
            Check(CRASH_LOOPING, "16m", [alert_labels(PROCESS)], value="3"),
            Check(CRASH_LOOPING, "22m", [alert_labels(PROCESS)], value="4"),
            *quiet((CRASH_LOOPING,), "9m"),
            *quiet((TARGET_DOWN, STALLED), "12m", "22m", "38m"),
        ],
    ),
    Case(
        "re-created pods (a new address each time) crash looping are counted too",
        [
            series(
                metrics.PROCESS_START.name,
                {**PROCESS, "instance": f"pod-{k}:9464"},
                segments(("_", 20 * k), (str(300 * k), 18), ("stale", 1)),
            )
            for k in range(5)
        ],
        [Check(CRASH_LOOPING, "21m", [alert_labels(PROCESS)], value="4")],
    ),
    Case(
        "one restart is not a crash loop, nor are four processes of one run up together",
        [
            *_RESTART_COMMON,
            *[
                series(metrics.PROCESS_START.name, {**PROCESS, "run": "ranks", "instance": f"rank-{k}:9464"}, "0x240")
                for k in range(4)
            ],
        ],
        quiet((CRASH_LOOPING,), "10m", "30m", "122m", "130m", "150m"),
    ),
]

_PAUSED = [("0", 120), ("1", 64), ("0", 120)]  # 30 min training, a 16-minute evaluation, training again
PAUSE: list[Case] = [
    Case(
        "a 16-minute evaluation the callback declared is a pause, not a stall",
        [
            _STARTED,
            series(metrics.STEPS.name, RUN, segments(("0+10", 120), ("1190", 64), ("1200+10", 120))),
            series(metrics.PHASE.name, {**PROCESS, "phase": "evaluate"}, segments(*_PAUSED)),
            series(
                metrics.PHASE.name,
                {**PROCESS, "phase": "train"},
                segments(*[("1" if v == "0" else "0", n) for v, n in _PAUSED]),
            ),
        ],
        quiet((STALLED,), "40m", "44m", "45m", "45m30s", "46m", "50m"),
    ),
    Case(
        "the same 16 minutes without a declared pause is a stall",
        [_STARTED, series(metrics.STEPS.name, RUN, segments(("0+10", 120), ("1190", 64), ("1200+10", 120)))],
        [Check(STALLED, "45m", [_JOB])],
    ),
    Case(
        "a pause that never ends (an evaluation hung for over an hour) is a stall",
        [
            _STARTED,
            series(metrics.STEPS.name, RUN, segments(("0+10", 120), ("1190", 400))),
            series(metrics.PHASE.name, {**PROCESS, "phase": "evaluate"}, segments(("0", 120), ("1", 400))),
        ],
        [Check(STALLED, "96m", [_JOB]), *quiet((STALLED,), "80m")],
    ),
]

# One NaN step every 7 minutes, from 1m on.
_SPORADIC = segments(("0", 4), *[(str(k), 28) for k in range(1, 10)])
SPORADIC_NAN: list[Case] = [
    Case(
        "a NaN step every 7 minutes is one alert that keeps firing, not one that flaps",
        [series(metrics.STEPS.name, RUN, "0+10x260"), series(metrics.NONFINITE.name, _DENSE, _SPORADIC)],
        [
            Check(NONFINITE, t, [alert_labels(_DENSE)], value=v)
            for t, v in (
                ("3m", "1"),
                ("7m", "1"),
                ("8m30s", "1"),
                ("14m", "1"),
                ("21m45s", "1"),
                ("40m", "1"),
                ("58m", "1"),
            )
        ],
    ),
]

_CHIEF = {**PROCESS, "instance": "w0:9464", "worker": "chief:0"}
_WORKER = {**PROCESS, "instance": "w1:9464", "worker": "worker:1"}
MULTI_WORKER: list[Case] = [
    Case(
        "two workers exporting every variable raise one alert per variable, not one per worker",
        [
            *[
                s
                for proc in (_CHIEF, _WORKER)
                for s in (
                    series(metrics.STEPS.name, {**proc, "optimizer": "adam"}, "10+10x120"),
                    series(
                        metrics.MISSING.name,
                        variable(
                            "head/kernel",
                            "head",
                            {**proc, "optimizer": "adam"},
                            cause=MissingCause.UNUSED,
                            expected="false",
                        ),
                        "10+10x120",
                    ),
                    series(
                        metrics.NONFINITE.name,
                        variable("dense/kernel", "dense", {**proc, "optimizer": "adam"}),
                        "0x20 0+1x100",
                    ),
                )
            ]
        ],
        [Check(DISCONNECTED, "3m", [alert_labels(_HEAD)]), Check(NONFINITE, "7m", [alert_labels(_DENSE)], value="7")],
    ),
    Case(
        "a job whose workers all stall is one stalled alert",
        [
            s
            for proc in (_CHIEF, _WORKER)
            for s in (
                series(metrics.STEPS.name, {**proc, "optimizer": "adam"}, "0+10x40 400x80"),
                series(metrics.PROCESS_START.name, proc, "0x120"),
            )
        ],
        [Check(STALLED, "26m", [_JOB])],
    ),
    Case(
        "one worker restarting while the other trains raises no run alert",
        [
            series(metrics.STEPS.name, {**_CHIEF, "optimizer": "adam"}, "0+10x720"),
            series(metrics.PROCESS_START.name, _CHIEF, "0x720"),
            series(metrics.GLOBAL_NORM.name, {**_CHIEF, "optimizer": "adam"}, "1x720"),
            series(metrics.STEPS.name, {**_WORKER, "optimizer": "adam"}, _restarted("0+10", ("0+10", 240))),
            series(metrics.PROCESS_START.name, _WORKER, _restarted("0", (str(_AFTER_START_S), 240))),
            series(
                metrics.GLOBAL_NORM.name, {**_WORKER, "optimizer": "adam"}, _restarted("1", [("15", 32), ("1", 208)])
            ),
        ],
        quiet(RUN_ALERTS, *_RESTART_TIMES),
    ),
]

EXPECTED_MISSING: list[Case] = [
    Case(
        "a disconnected variable fires within 2 minutes; an expect_missing one never does",
        [
            series(metrics.STEPS.name, RUN, "10+10x120"),
            series(metrics.MISSING.name, _HEAD, "10+10x120"),
            series(metrics.MISSING.name, _AUX, "10+10x120"),
        ],
        [Check(DISCONNECTED, t, [alert_labels(_HEAD)]) for t in ("2m", "10m", "30m")],
    ),
    Case(
        "a variable missing for a few steps, or at a third of the steps (a branch taken sometimes), is quiet",
        [
            series(metrics.STEPS.name, RUN, "10+10x120"),
            series(metrics.MISSING.name, _HEAD, "5+1x4 9x116"),
            series(metrics.MISSING.name, _GATE, "3+3x120"),
        ],
        quiet((DISCONNECTED,), "1m", "2m", "5m", "20m"),
    ),
    Case(
        "a slow run missing a variable at its first few steps is quiet until it has missed 10",
        [series(metrics.STEPS.name, RUN, "1+1x120"), series(metrics.MISSING.name, _HEAD, "1+1x120")],
        [*quiet((DISCONNECTED,), "1m", "2m"), Check(DISCONNECTED, "4m", [alert_labels(_HEAD)])],
    ),
]

#: The test files: name -> cases (deploy/prometheus/tests/<name>.yml).
SCENARIOS: dict[str, list[Case]] = {
    "alerts": BASICS,
    "restart-from-scratch": RESTART_FROM_SCRATCH,
    "restart-from-checkpoint": RESTART_FROM_CHECKPOINT,
    "crash-loop": CRASH_LOOP,
    "pause": PAUSE,
    "sporadic-nan": SPORADIC_NAN,
    "multi-worker": MULTI_WORKER,
    "expected-missing": EXPECTED_MISSING,
}

_LABEL = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")
_VALUE = re.compile(r"\{\{\s*\$value(?:\s*\|\s*humanize)?\s*\}\}")


def render(template: str, labels: dict[str, str], value: str, origin: tuple[int, str, str] | None = None) -> str:
    """Expand the template forms gradtel's annotations use: ``$labels.x``, ``$value`` and the NonFinite alert's
    query of where the NaN began (``origin``, as the check expects it)."""
    said = alerts.NO_ORIGIN
    if origin is not None:
        said = f"The first non-finite gradient was at step {origin[0]} in {origin[1]} (layer {origin[2]}). "
    template = template.replace(alerts.nonfinite_origin(), said)
    text = _VALUE.sub(value, _LABEL.sub(lambda m: labels.get(m.group(1), ""), template))
    if "{{" in text:
        raise ValueError(f"unsupported template syntax left in {text!r}")
    return text


def promtool_tests(cases: list[Case], rule_file: str = RULE_FILE) -> dict[str, Any]:
    """The promtool test file for ``cases``."""
    rules = {alert.name: alert.rule() for alert in alerts.alerts()}
    tests = []
    for case in cases:
        checks = []
        for check in case.checks:
            rule = rules[check.alert]
            checks.append(
                {
                    "eval_time": check.eval_time,
                    "alertname": check.alert,
                    "exp_alerts": [
                        {
                            "exp_labels": {**labels, **rule["labels"]},
                            "exp_annotations": {
                                key: render(text, labels, check.value, check.origin)
                                for key, text in rule["annotations"].items()
                            },
                        }
                        for labels in check.expected
                    ],
                }
            )
        tests.append(
            {"name": case.name, "interval": INTERVAL, "input_series": case.input_series, "alert_rule_test": checks}
        )
    return {"rule_files": [rule_file], "evaluation_interval": INTERVAL, "tests": tests}
