"""The declarative table of per-variable statistics (gradtel/statistics.py) drives every place that handles one.

Each test trains a real Keras optimizer on CPU and checks, statistic by statistic, that the table's entry is what
the packed row, the record, the merge of two variable lists, the layer roll-up, the report and the export do.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel import export, layout, metrics, statistics
from gradtel.records import VariableRecord
from gradtel.series import SeriesPolicy
from gradtel.statistics import STATISTICS, Merge, Report, RollUp, Update

FIELDS = [s.field for s in STATISTICS]


def test_the_record_the_rows_and_the_step_block_follow_the_table_order() -> None:
    record_fields = [f for f in VariableRecord._fields if f in statistics.ROW]
    assert record_fields == FIELDS  # every statistic is a typed record field, in table order
    assert VariableRecord._fields[-len(FIELDS) :] == tuple(FIELDS)  # after the identity and cause fields
    assert len(STATISTICS) == layout.N_ROWS and [statistics.ROW[f] for f in FIELDS] == list(range(len(FIELDS)))
    # stats.py folds the first-bad and recovery rows as one trailing block of [first x3, recovered x3]
    updates = [s.update for s in STATISTICS]
    assert updates[-6:] == [Update.FIRST] * 3 + [Update.LATEST_SET] * 3
    assert Update.FIRST not in updates[:-6] and Update.LATEST_SET not in updates[:-6]
    # the table's storage blocks (gradtel/layout.py): the counters after STEPS_SEEN (read from the step count), the
    # latest values ending with STATE (the step reads the previous one there), then the first-bad and recovery rows
    counters = tuple(i for i, s in enumerate(STATISTICS) if s.update is Update.COUNT)
    assert counters == (layout.STEPS_SEEN, *layout.ACCUMULATED_ROWS)
    assert tuple(i for i, s in enumerate(STATISTICS) if s.update is Update.LATEST) == layout.LATEST_ROWS
    assert layout.LATEST_ROWS[-1] == layout.STATE
    assert (layout.STEPS_SEEN, *layout.ACCUMULATED_ROWS, *layout.LATEST_ROWS, *layout.MAX_ROWS) == tuple(
        range(len(FIELDS))
    )
    assert len({s.key for s in STATISTICS}) == len(STATISTICS)
    assert all(not s.requires or s.requires in statistics.ROW for s in STATISTICS)


def _train(optimizer: keras.optimizers.Optimizer, variables: list, gradients: list[list]) -> None:
    @tf.function
    def step(*grads):
        optimizer.apply_gradients(zip(list(grads), variables, strict=True))

    for grads in gradients:
        step(*[None if g is None else tf.constant(g, tf.float32) for g in grads])


@pytest.fixture
def trained():
    """Three variables of two layers through steps that leave every statistic non-trivial: w goes non-finite
    then recovers, b is zero twice, u is missing throughout."""
    dense_layer, head = keras.layers.Dense(2, name="dense"), keras.layers.Dense(3, name="head")
    dense_layer.build((None, 2))
    head.build((None, 1))
    w, b, u = dense_layer.kernel, dense_layer.bias, head.bias
    optimizer = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(optimizer, name="table", start_exporter=False, max_abs=True)
    nan = np.full((2, 2), np.nan)
    _train(
        optimizer,
        [w, b, u],
        [
            [np.ones((2, 2)), np.zeros(2), None],
            [nan, np.zeros(2), None],
            [np.full((2, 2), 3.0), np.array([0.0, 4.0]), None],
        ],
    )
    yield handle, optimizer, [w, b, u]
    gradtel.uninstrument(optimizer)


def test_each_statistic_is_decoded_from_its_row_into_the_record_and_the_report(trained) -> None:
    handle, _, _ = trained
    ((_, snap),) = handle.tables.snapshots()
    records = {r.name: r for r in handle.records()}
    assert set(records) == {"dense/kernel", "dense/bias", "head/bias"}
    for i, name in enumerate(["dense/kernel", "dense/bias", "head/bias"]):
        for s in STATISTICS:
            if s.field == "state":
                continue
            raw = snap.rows[statistics.ROW[s.field], i]
            if s.requires and not snap.rows[statistics.ROW[s.requires], i]:
                raw = 0.0
            value = getattr(records[name], s.field)
            if s.integer:
                assert isinstance(value, int) and value == int(raw), (name, s.field)
            else:
                assert value == raw or (math.isnan(value) and math.isnan(raw)), (name, s.field)
    w, b, u = records["dense/kernel"], records["dense/bias"], records["head/bias"]
    assert (w.steps, w.nonfinite_steps, w.first_nonfinite_step, w.recovered_nonfinite_step) == (3, 1, 2, 3)
    assert w.norm == pytest.approx(6.0) and w.max_abs == 3.0 and w.rows_touched == 4
    assert (b.zero_steps, b.first_zero_step, b.recovered_zero_step, b.norm) == (2, 1, 3, 4.0)
    assert (u.missing_steps, u.first_missing_step, u.recovered_missing_step, u.state) == (3, 1, 0, "missing")

    report = {v["name"]: v for v in gradtel.report()["variables"] if v["optimizer"] == "table"}
    for name, record in records.items():
        entry = report[name]
        for s in STATISTICS:
            value = getattr(record, s.field)
            if s.report is Report.OMITTED:
                assert s.key not in entry
            elif s.report is Report.STEP:
                assert entry[s.key] == (value or None)
            elif s.report is Report.GRADIENT_VALUE:
                assert entry[s.key] == (None if record.state == "missing" or not math.isfinite(value) else value)
            else:
                assert entry[s.key] == value
        # what was measured, then why, then when
        keys = list(entry)
        assert keys.index("cause") == keys.index("first_missing_step") - 1
    assert report["head/bias"]["last_norm"] is None and report["dense/kernel"]["last_max_abs"] == 3.0


def test_merge_and_roll_up_follow_each_statistics_rule(trained) -> None:
    handle, optimizer, (w, _, _) = trained
    before = {r.name: r for r in handle.records()}
    # a second variable list holding w: one more step, non-finite, on its own table
    _train(optimizer, [w], [[np.full((2, 2), np.inf)]])
    after = {r.name: r for r in handle.records()}
    ((_, second),) = [(t, s) for t, s in handle.tables.snapshots() if len(t.names) == 1]
    older, newer = before["dense/kernel"], after["dense/kernel"]
    only_second = {s.field: second.rows[statistics.ROW[s.field], 0] for s in STATISTICS}
    for s in STATISTICS:
        mine = only_second[s.field]
        if s.field == "state":
            continue
        if s.requires and not only_second[s.requires]:
            mine = 0
        expected = {
            Merge.ADD: getattr(older, s.field) + mine,
            Merge.NEWER: mine,
            Merge.OLDER_FIRST: getattr(older, s.field) or mine,
            Merge.NEWER_FIRST: mine or getattr(older, s.field),
        }[s.merge]
        value = getattr(newer, s.field)
        assert value == expected or (math.isnan(value) and math.isnan(expected)), s.field
    assert newer.steps == 4 and newer.nonfinite_steps == 2 and newer.first_nonfinite_step == 2

    (dense,) = [r for r in SeriesPolicy(mode="layer").select(list(before.values())).records if r.name == "dense/*"]
    members = [before["dense/kernel"], before["dense/bias"]]
    for s in STATISTICS:
        if s.field == "state":  # "mixed" when the members' states differ (series.py)
            continue
        values = [getattr(r, s.field) for r in members]
        expected = {
            RollUp.SUM: sum(values),
            RollUp.MAX: max(values),
            RollUp.ROOT_SUM_SQUARES: math.sqrt(sum(v * v for v in values)),
            RollUp.MAX_WHERE_FINITE_NORM: max(values),
        }.get(s.roll_up, VariableRecord._field_defaults.get(s.field))
        assert getattr(dense, s.field) == pytest.approx(expected), s.field
    assert dense.norm == pytest.approx(math.sqrt(36.0 + 16.0)) and dense.zero_steps == 2 and dense.steps == 3


def test_the_exported_per_variable_metrics_are_the_tables() -> None:
    assert tuple(s.metric for s in STATISTICS if s.metric is not None) == export.PER_VARIABLE
    # in the documentation order of metrics.ALL, which the dashboards and the docs follow
    assert list(export.PER_VARIABLE) == [m for m in metrics.ALL if m in export.PER_VARIABLE]
    assert [m.name for m in export.PER_VARIABLE] == [
        "gradtel_gradient_missing_total",
        "gradtel_gradient_zero_total",
        "gradtel_gradient_nonfinite_total",
        "gradtel_gradient_norm",
        "gradtel_gradient_max_abs",
    ]
