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
#: The join key between a per-variable series and its process's step counter.
RUN_KEY: tuple[str, ...] = (*TARGET_LABELS, *metrics.COMMON_LABELS)
#: The join key between a process-level series (start time, phase) and the others.
PROCESS_KEY: tuple[str, ...] = (*TARGET_LABELS, *metrics.PROCESS_LABELS)
#: The global norm without NaN/Inf samples (those have their own alert and would poison the medians), one series
#: per process: the ``process_start`` label keeps a restarted process's baseline apart from the one before.
FINITE_GLOBAL_NORM = "run:gradtel_gradient_global_norm:finite"
#: The label :data:`FINITE_GLOBAL_NORM` carries the process start time in.
PROCESS_START_LABEL = "process_start"
#: Variables declared intentionally disconnected (expect_missing) never alert.
_UNEXPECTED = 'expected!="true"'


@dataclass(frozen=True)
class Config:
    """Selectors, windows and thresholds of the rules (kubernetes-mixin's ``_config``)."""

    #: ``up`` series of gradtel targets; the shipped scrape configs all name their job ``...gradtel...``.
    target_selector: str = 'job=~".*gradtel.*"'
    #: Labels that change when a process restarts (the scrape address, the Kubernetes pod). Alerts aggregate them
    #: away, with ``worker`` (the same gradients on every worker), so that an alert follows the job: one
    #: identity across restarts and workers.
    process_labels: tuple[str, ...] = ("instance", "pod")
    #: A share of steps at or above this counts as "every step" (the margin absorbs scrape skew).
    every_step: float = 0.99
    #: Missing is certain from the first traced step: missing at every step since the process started (true from
    #: the first scrape) or over a short window (4 scrapes at 15 s), for a minute, makes the alert fire within 2
    #: minutes; ``missing_min_steps`` keeps a few missing steps of a slow run quiet.
    missing_window: str = "1m"
    missing_for: str = "1m"
    missing_min_steps: int = 10
    zero_window: str = "10m"
    zero_for: str = "10m"
    nonfinite_window: str = "5m"
    nonfinite_for: str = "1m"
    #: Sporadic NaN steps keep one alert firing instead of firing and resolving again and again.
    nonfinite_keep_firing: str = "30m"
    #: The recent global norm is the median over this window...
    norm_recent: str = "5m"
    #: ...compared with the median over this window, which ends where the recent one starts.
    norm_baseline: str = "1h"
    #: A process needs this much history before its baseline is trusted (early training moves a lot, and so does
    #: a restart: its optimizer state, warm-up and data order start again).
    norm_min_history: str = "15m"
    exploding_factor: float = 10.0
    exploding_for: str = "2m"
    vanishing_factor: float = 0.01
    vanishing_for: str = "15m"
    #: Norm alerts stay firing this long after recovering, so a noisy norm does not flap them.
    norm_keep_firing: str = "10m"
    #: No step for this long while training (and a process at least this old: start-up is not a stall)...
    stalled_window: str = "10m"
    #: ...or for this long during a pause the process declared (evaluation, epoch end, checkpoint, idle).
    paused_stalled_window: str = "1h"
    stalled_for: str = "5m"
    #: This many restarts of one worker of a run within the window is a crash loop.
    crashloop_restarts: int = 3
    crashloop_window: str = "30m"
    #: How far back a target must have exported gradtel metrics to count as a gradtel target when it is down.
    target_memory: str = "1h"
    target_down_for: str = "5m"
    overflow_for: str = "5m"


@dataclass(frozen=True)
class Alert:
    """One alerting rule with the annotations every gradtel alert carries."""

    name: str
    expr: str
    duration: str | None
    severity: str
    summary: str
    description: str
    keep_firing_for: str | None = None

    def rule(self) -> dict[str, Any]:
        """The rule as it appears in a Prometheus rule file."""
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.duration:
            rule["for"] = self.duration
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


def _seconds(duration: str) -> int:
    """A Prometheus duration of one unit (``10m``, ``1h``) in seconds, for comparisons with ``time()``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(duration[:-1]) * units[duration[-1]]


#: The NonFinite alert's words when no ``gradtel_nonfinite_origin_step`` series names where the NaN began.
NO_ORIGIN = "Where it began is not known (no gradtel_nonfinite_origin_step series)."


def nonfinite_origin() -> str:
    """Where the NaN began, read from gradtel_nonfinite_origin_step when the alert fires: the variable whose
    gradient went non-finite first is the one to look at, not the many that followed it a step later."""
    query = f'printf "{metrics.NONFINITE_ORIGIN.name}{{run=%q,optimizer=%q}}" $labels.run $labels.optimizer | query'
    return (
        f"{{{{ with {query} }}}}{{{{ range . }}}}The first non-finite gradient was at step "
        '{{ .Value | printf "%.0f" }} in {{ .Labels.variable }} (layer {{ .Labels.layer }}). {{ end }}'
        f"{{{{ else }}}}{NO_ORIGIN}{{{{ end }}}}"
    )


def _per_job(c: Config, expr: str, *also: str, aggregation: str = "max") -> str:
    """``expr`` with the labels of the process (and ``also``) aggregated away: one alert per job, not process."""
    return f"{aggregation} without ({', '.join((*c.process_labels, *also))}) (\n{expr}\n)"


def _alive(key: tuple[str, ...] = RUN_KEY) -> str:
    """Keeps only series of processes scraped now: a dead process's series are stale, so its alerts end (and
    never start) although its samples stay in the range windows for a while."""
    return f"and {_on(key)} {metrics.STEPS.name}"


def _share_of_steps(metric: metrics.Metric, window: str, matchers: str = "") -> str:
    """Per series of ``metric``: the fraction of the process's steps over ``window`` that ``metric`` counted.

    0/0 (a process that did not step) is NaN and compares false, so a stalled run never looks disconnected.
    Counter resets (a restart at the same address) are handled by rate().
    """
    selector = f"{metric.name}{{{matchers}}}" if matchers else metric.name
    return f"rate({selector}[{window}])\n  / {_on(RUN_KEY)} group_left ()\nrate({metrics.STEPS.name}[{window}])"


def _share_since_start(metric: metrics.Metric, matchers: str) -> str:
    """Per series of ``metric``: the fraction of all the process's steps that ``metric`` counted. True from the
    first scrape of a variable missing since the first step (a rate needs a second scrape first)."""
    return f"{metric.name}{{{matchers}}}\n  / {_on(RUN_KEY)} group_left ()\n{metrics.STEPS.name}"


def _median(window: str, offset: str = "") -> str:
    shifted = f" offset {offset}" if offset else ""
    return f"quantile_over_time(0.5, {FINITE_GLOBAL_NORM}[{window}]{shifted})"


def _against_baseline(c: Config, comparison: str, factor: float) -> str:
    """The process's recent median norm compared with ``factor`` times its own median before that; a process
    younger than ``norm_min_history`` (a restart included) has no baseline yet."""
    return _per_job(
        c,
        (
            f"{_median(c.norm_recent)}\n"
            f"  {comparison} {factor:g} * {_median(c.norm_baseline, c.norm_recent)}\n"
            f"and {FINITE_GLOBAL_NORM} offset {c.norm_min_history}\n"
            f"and {FINITE_GLOBAL_NORM}"
        ),
        "worker",
        PROCESS_START_LABEL,
    )


def _process_age_at_least(window: str) -> str:
    return f"and {_on(PROCESS_KEY)} (time() - {metrics.PROCESS_START.name} >= {_seconds(window)})"


def _stalled(c: Config) -> str:
    steps = metrics.STEPS.name
    paused = f'{metrics.PHASE.name}{{phase!="train"}} == 1'
    return _per_job(
        c,
        (
            f"(\n  increase({steps}[{c.stalled_window}]) == 0\n"
            f"  unless {_on(PROCESS_KEY)} ({paused})\n"
            f"  {_process_age_at_least(c.stalled_window)}\n)\n"
            f"or\n"
            f"(\n  increase({steps}[{c.paused_stalled_window}]) == 0\n"
            f"  {_process_age_at_least(c.paused_stalled_window)}\n)"
        ),
        "worker",
    )


def _restarts(c: Config) -> str:
    """Restarts of one worker of a run in the window: the distinct process start times seen (a new value at the
    same address, or a new address), less the most processes that were up at once (concurrent processes of one
    run and worker, if any, are not restarts)."""
    start = metrics.PROCESS_START.name
    labels = ", ".join(c.process_labels)
    return (
        f"sum without ({labels}) (changes({start}[{c.crashloop_window}]) + 1)\n"
        f"  - max_over_time((count without ({labels}) ({start}))[{c.crashloop_window}:1m])"
    )


def recording_rules() -> list[dict[str, Any]]:
    """Recording rules the alerts build on."""
    per_process = f'count_values without () ("{PROCESS_START_LABEL}", {metrics.PROCESS_START.name})'
    return [
        {
            "record": FINITE_GLOBAL_NORM,
            "expr": (
                f"({metrics.GLOBAL_NORM.name} < +Inf)\n"
                f"  * {_on(PROCESS_KEY)} group_left ({PROCESS_START_LABEL})\n{per_process}"
            ),
        }
    ]


def alerts(c: Config = Config()) -> list[Alert]:
    """gradtel's alerts, most specific first."""
    run = "run {{ $labels.run }} (job {{ $labels.job }}, optimizer {{ $labels.optimizer }})"
    variable = "Variable {{ $labels.variable }} (layer {{ $labels.layer }}) of " + run
    every = f">= {c.every_step:g}"
    return [
        Alert(
            "GradtelVariableDisconnected",
            _per_job(
                c,
                (
                    f"(\n{_share_of_steps(metrics.MISSING, c.missing_window, _UNEXPECTED)}\n  {every}\n"
                    f"or\n{_share_since_start(metrics.MISSING, _UNEXPECTED)}\n  {every}\n)\n"
                    f"and {metrics.MISSING.name}{{{_UNEXPECTED}}} >= {c.missing_min_steps}"
                ),
                "worker",
            ),
            c.missing_for,
            "warning",
            "A trainable variable gets no gradient: it is not training.",
            f"{variable} had no gradient (None) at every step for {c.missing_for} or more; diagnosed cause: "
            "{{ $labels.cause }}. The optimizer never updates it. Declare it with expect_missing if this is "
            "intended.",
        ),
        Alert(
            "GradtelGradientNonFinite",
            _per_job(c, f"increase({metrics.NONFINITE.name}[{c.nonfinite_window}]) > 0\n{_alive()}", "worker"),
            c.nonfinite_for,
            "critical",
            "Gradients hold NaN or Inf: the run is diverging.",
            f"{variable} had a NaN or Inf gradient in {{{{ $value | humanize }}}} steps over the last "
            f"{c.nonfinite_window}. Applying it corrupts the weights. The alert keeps firing "
            f"{c.nonfinite_keep_firing} after the last one, so sporadic NaN steps are one alert. {nonfinite_origin()}",
            keep_firing_for=c.nonfinite_keep_firing,
        ),
        Alert(
            "GradtelGradientAllZero",
            _per_job(c, f"{_share_of_steps(metrics.ZERO, c.zero_window)}\n  {every}\n{_alive()}", "worker"),
            c.zero_for,
            "warning",
            "A variable's gradient is exactly zero at every step.",
            f"{variable} had an all-zero gradient at every step for {c.zero_window} or more: it is "
            "connected to the loss but does not learn (dead units, a zero-gradient op, float16 underflow).",
        ),
        Alert(
            "GradtelGradientNormExploding",
            _against_baseline(c, ">", c.exploding_factor),
            c.exploding_for,
            "warning",
            "The global gradient norm grew far above the run's own baseline.",
            f"The median global gradient norm of {run} over {c.norm_recent} is "
            f"{{{{ $value | humanize }}}}, more than {c.exploding_factor:g}x its median over the "
            f"{c.norm_baseline} before. The run is likely to diverge.",
            keep_firing_for=c.norm_keep_firing,
        ),
        Alert(
            "GradtelGradientNormVanishing",
            _against_baseline(c, "<", c.vanishing_factor),
            c.vanishing_for,
            "warning",
            "The global gradient norm collapsed far below the run's own baseline.",
            f"The median global gradient norm of {run} over {c.norm_recent} is "
            f"{{{{ $value | humanize }}}}, less than {c.vanishing_factor:g}x its median over the "
            f"{c.norm_baseline} before. Training has all but stopped learning.",
            keep_firing_for=c.norm_keep_firing,
        ),
        Alert(
            "GradtelStepsStalled",
            _stalled(c),
            c.stalled_for,
            "warning",
            "A training run stopped taking optimizer steps.",
            f"{run} took no optimizer step for {c.stalled_window} while training, or for "
            f"{c.paused_stalled_window} during a pause it declared (evaluation, epoch end, checkpoint, after "
            "fit), while its process still serves metrics: it is hung (input pipeline, collective, deadlock) "
            "or stuck outside the training loop.",
        ),
        Alert(
            "GradtelCrashLooping",
            f"{_restarts(c)}\n  >= {c.crashloop_restarts}",
            None,
            "warning",
            "A training job keeps restarting.",
            "Worker '{{ $labels.worker }}' of run {{ $labels.run }} (job {{ $labels.job }}) restarted "
            f"{{{{ $value }}}} times in {c.crashloop_window}: it crashes (or is killed) and starts again, so "
            "it makes little or no progress although it is up most of the time.",
        ),
        Alert(
            "GradtelTargetDown",
            f"up{{{c.target_selector}}} == 0\n"
            f"or\n"
            f"up == 0 and {_on(TARGET_LABELS)}\n"
            f"  group by ({', '.join(TARGET_LABELS)})"
            f" (last_over_time({metrics.STEPS.name}[{c.target_memory}]))",
            c.target_down_for,
            "warning",
            "Prometheus cannot scrape a gradtel training process.",
            "{{ $labels.job }}/{{ $labels.instance }} failed every scrape for "
            f"{c.target_down_for}: the process died or hangs, or its metrics endpoint is not reachable "
            "(OTEL_EXPORTER_PROMETHEUS_HOST must be 0.0.0.0 in containers).",
        ),
        Alert(
            "GradtelMetricsOverflow",
            f'count by ({", ".join(TARGET_LABELS)}) ({{__name__=~"gradtel_.+", otel_metric_overflow="true"}}) > 0',
            c.overflow_for,
            "warning",
            "gradtel hit its series limit: some variables' metrics are folded together.",
            "{{ $labels.job }}/{{ $labels.instance }}: {{ $value }} gradtel metrics exceeded the "
            "OpenTelemetry cardinality limit, so their extra series are folded into one "
            'otel_metric_overflow="true" series and some variables have no series of their own. Raise '
            "GRADTEL_MAX_SERIES.",
        ),
    ]


def rule_groups(c: Config = Config()) -> list[dict[str, Any]]:
    """The ``groups`` of the rule file (and of the PrometheusRule's spec)."""
    return [
        {"name": "gradtel.rules", "rules": recording_rules()},
        {"name": "gradtel.alerts", "rules": [alert.rule() for alert in alerts(c)]},
    ]
