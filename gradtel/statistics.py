"""The one table of gradtel's per-variable statistics: every place that handles one reads its entry here.

A statistic is one row of the packed accumulator (gradtel/layout.py numbers the rows in this table's order), one
field of ``VariableRecord`` (gradtel/records.py, same name, same order), and, by the rules named below: how the
step folds it into the table (gradtel/stats.py), how two variable lists' records of one variable merge
(records.py), how a layer's records roll up into one series (gradtel/series.py), which metric exports it
(gradtel/metrics.py, gradtel/export.py) and which field of the JSON report carries it (gradtel/reporting.py). Adding
a statistic is one entry here, its field on ``VariableRecord``, its in-graph value in ``stats.py``, and its test.

Kept free of TensorFlow and OpenTelemetry: the exporter, the report and the CLI read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gradtel import metrics


class Update(str, Enum):
    """How the step folds its value into the table's row."""

    COUNT = "count"  # accumulates: the number of steps in that condition
    LATEST = "latest"  # the latest step's value
    FIRST = "first"  # the first step at which it happened, kept once set (computed with the recoveries)
    LATEST_SET = "latest_set"  # the latest step at which it happened (computed with the first steps)


class Merge(str, Enum):
    """How the records of one variable seen through two variable lists (older, newer) combine."""

    ADD = "add"
    NEWER = "newer"
    OLDER_FIRST = "older_first"  # the older one's when set (a first step), else the newer one's
    NEWER_FIRST = "newer_first"  # the newer one's when set (a latest step), else the older one's


class RollUp(str, Enum):
    """How a layer's records become the one record of its roll-up series (gradtel/series.py)."""

    SUM = "sum"
    MAX = "max"
    ROOT_SUM_SQUARES = "root_sum_squares"  # over the finite values; NaN when none is finite (a norm)
    MAX_WHERE_FINITE_NORM = "max_where_finite_norm"  # over the members with a finite norm; NaN when none (max |g|)
    NONE = "none"  # not rolled up: the record's default (0)


class Report(str, Enum):
    """How the JSON report writes the value (docs/report.md)."""

    NUMBER = "number"  # as is
    GRADIENT_VALUE = "gradient_value"  # null when non-finite or when the latest step had no gradient
    STEP = "step"  # a step number; null for 0 (never happened)
    OMITTED = "omitted"  # not a field of its own (the state becomes "status")


@dataclass(frozen=True)
class Statistic:
    """One per-variable statistic (see the module docstring)."""

    field: str  # its VariableRecord field
    update: Update
    merge: Merge
    roll_up: RollUp
    report: Report
    report_field: str = ""  # the report's key; the field's name when empty
    metric: metrics.Metric | None = None  # the per-variable metric exporting it, if any
    integer: bool = True  # decoded from the float64 row as an int
    #: A step statistic valid only when this other one is set (a recovery from a state never counted as bad, such as
    #: a loss-scale optimizer's skipped step, is none).
    requires: str = ""

    @property
    def key(self) -> str:
        """The report's key for it."""
        return self.report_field or self.field


#: Every per-variable statistic, in row, record-field and report order.
STATISTICS: tuple[Statistic, ...] = (
    Statistic("steps", Update.COUNT, Merge.ADD, RollUp.MAX, Report.NUMBER),
    Statistic("missing_steps", Update.COUNT, Merge.ADD, RollUp.SUM, Report.NUMBER, metric=metrics.MISSING),
    Statistic("zero_steps", Update.COUNT, Merge.ADD, RollUp.SUM, Report.NUMBER, metric=metrics.ZERO),
    Statistic("nonfinite_steps", Update.COUNT, Merge.ADD, RollUp.SUM, Report.NUMBER, metric=metrics.NONFINITE),
    Statistic(
        "norm",
        Update.LATEST,
        Merge.NEWER,
        RollUp.ROOT_SUM_SQUARES,
        Report.GRADIENT_VALUE,
        "last_norm",
        metrics.NORM,
        integer=False,
    ),
    Statistic(
        "max_abs",
        Update.LATEST,
        Merge.NEWER,
        RollUp.MAX_WHERE_FINITE_NORM,
        Report.GRADIENT_VALUE,
        "last_max_abs",
        metrics.MAX_ABS,
        integer=False,
    ),
    Statistic("rows_touched", Update.LATEST, Merge.NEWER, RollUp.SUM, Report.NUMBER),
    # decoded into a State by gradtel/records.py (with the replica and expect_missing facts the table lacks)
    Statistic("state", Update.LATEST, Merge.NEWER, RollUp.NONE, Report.OMITTED, integer=False),
    Statistic("first_missing_step", Update.FIRST, Merge.OLDER_FIRST, RollUp.NONE, Report.STEP),
    Statistic("first_zero_step", Update.FIRST, Merge.OLDER_FIRST, RollUp.NONE, Report.STEP),
    Statistic("first_nonfinite_step", Update.FIRST, Merge.OLDER_FIRST, RollUp.NONE, Report.STEP),
    Statistic(
        "recovered_missing_step",
        Update.LATEST_SET,
        Merge.NEWER_FIRST,
        RollUp.NONE,
        Report.STEP,
        requires="first_missing_step",
    ),
    Statistic(
        "recovered_zero_step",
        Update.LATEST_SET,
        Merge.NEWER_FIRST,
        RollUp.NONE,
        Report.STEP,
        requires="first_zero_step",
    ),
    Statistic(
        "recovered_nonfinite_step",
        Update.LATEST_SET,
        Merge.NEWER_FIRST,
        RollUp.NONE,
        Report.STEP,
        requires="first_nonfinite_step",
    ),
)

#: Each statistic's row in the packed accumulator.
ROW: dict[str, int] = {s.field: i for i, s in enumerate(STATISTICS)}
