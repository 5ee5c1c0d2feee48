"""``gradtel run`` / ``gradtel check`` on unmodified scripts, the JSON report, and the enriched Keras error."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel import runner
from gradtel.keras import GradientTelemetry
from tests.core.test_cli import BIN, ENV
from tests.pitfalls import UntrackedScale

SCRIPT = textwrap.dedent("""
    import sys, time, keras, numpy as np
    mode = sys.argv[1]
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, name="hidden")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(1, name="main")(hidden),
                                 keras.layers.Dense(1, name="aux")(hidden)])  # AUX HEAD
    model.compile(optimizer="adam", loss=["mse", None])
    if mode != "no-steps":
        model.fit(np.ones((32, 4)), np.ones((32, 1)), batch_size=8, epochs=1, verbose=0)
    if mode == "exit3":
        sys.exit(3)
    if mode == "raise":
        raise RuntimeError("script failed")
    if mode == "wait":
        open(sys.argv[2], "w").close()
        time.sleep(120)
""")
VARIABLE_KEYS = {
    "name",
    "optimizer",
    "layer",
    "status",
    "expected",
    "steps",
    "missing_steps",
    "zero_steps",
    "nonfinite_steps",
    "last_norm",
    "last_max_abs",
    "rows_touched",
    "cause",
    "first_missing_step",
    "first_zero_step",
    "first_nonfinite_step",
    "recovered_missing_step",
    "recovered_zero_step",
    "recovered_nonfinite_step",
}


def gradtel_cli(tmp_path, *args: str, mode: str, **popen) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**ENV, "OTEL_METRICS_EXPORTER": "none"}
    return subprocess.Popen(
        [BIN / "gradtel", *args, "--", sys.executable, script, mode, str(tmp_path / "ready")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def check_report(path, steps: int) -> dict:
    report = json.loads(path.read_text())
    assert report["schema"] == "gradtel.report/v1"
    variables = {v["name"]: v for v in report["variables"]}
    assert all(set(v) == VARIABLE_KEYS for v in variables.values())
    assert variables["aux/kernel"]["status"] == "missing"
    assert variables["aux/kernel"]["missing_steps"] == steps
    assert variables["aux/kernel"]["cause"]["category"] == "not_on_loss_path"
    assert variables["hidden/kernel"]["status"] == "ok" and variables["hidden/kernel"]["last_norm"] > 0
    finding = next(f for f in report["findings"] if f["category"] == "not_on_loss_path")
    assert sorted(finding["variables"]) == ["aux/bias", "aux/kernel"]
    return report


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "status"), [("exit3", 3), ("raise", 1), ("ok", 0)])
def test_run_keeps_the_exit_status_and_writes_the_report(tmp_path, mode, status):
    proc = gradtel_cli(tmp_path, "run", "--report", str(tmp_path / "report.json"), mode=mode)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    check_report(tmp_path / "report.json", steps=4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gradtel-report-")]  # no temporary left
    # However the script ends, the summary on stderr names the disconnected head and a line of the script.
    summary = [line for line in err.splitlines() if line.startswith("gradtel: ")]
    assert summary[0] == "gradtel: optimizers: adam (4 steps)"
    script = re.escape(str(tmp_path / "train.py"))
    assert re.fullmatch(rf"gradtel: not_on_loss_path: aux/kernel, aux/bias \(at {script}:\d+\)", summary[1]), summary


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_writes_the_report_when_interrupted(tmp_path, sig):
    proc = gradtel_cli(tmp_path, "run", "--report", str(tmp_path / "report.json"), mode="wait")
    deadline = time.monotonic() + 90
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == -sig  # the script's own fate: killed by that signal
    check_report(tmp_path / "report.json", steps=4)


@pytest.mark.slow
def test_check_fails_on_a_disconnected_head_and_passes_when_it_is_expected(tmp_path):
    proc = gradtel_cli(tmp_path, "check", mode="ok")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    row = next(line.split() for line in out.splitlines() if " aux/kernel " in line)
    assert row[2:4] == ["missing", "not_on_loss_path"]
    lines = {n for n, text in enumerate(SCRIPT.splitlines(), 1) if "model.fit" in text or "AUX HEAD" in text}
    assert any(row[4].endswith(f"train.py:{n}") for n in lines)  # the fit call, or the aux head's line
    assert "How to fix:" in out

    proc = gradtel_cli(tmp_path, "check", "--json", "--expect-missing", "aux/*", mode="ok")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["optimizers"][0]["steps"] >= 1
    assert {v["name"]: v["expected"] for v in report["variables"]}["aux/bias"] is True


@pytest.mark.slow
def test_check_says_so_when_the_script_takes_no_step(tmp_path):
    proc = gradtel_cli(tmp_path, "check", mode="no-steps")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert "ended before 1 optimizer step" in err


def test_no_gradients_error_keeps_keras_words_and_adds_the_causes():
    frozen = keras.Variable(np.ones(3, "float32"), name="frozen_w", trainable=False)
    opt = keras.optimizers.SGD()
    gradtel.instrument(opt, name="enriched", start_exporter=False)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(frozen * 2.0)
    grads = tape.gradient(loss, [frozen])
    with pytest.raises(ValueError) as info:
        opt.apply_gradients(zip(grads, [frozen], strict=True))
    message = str(info.value)
    assert message.startswith("No gradients provided for any variable")
    assert "frozen_w: not_trainable" in message
    gradtel.uninstrument(opt)


def test_report_matches_the_handles(tmp_path):
    var = keras.Variable(np.ones(2, "float32"), name="r")
    opt = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(opt, name="report-match", max_abs=True, start_exporter=False)
    opt.apply_gradients([(tf.constant([3.0, 4.0]), var)])
    report = gradtel.report()
    mine = [v for v in report["variables"] if v["optimizer"] == "report-match"]
    assert mine == [{**mine[0], "name": "r", "status": "ok", "steps": 1, "last_norm": 5.0, "last_max_abs": 4.0}]
    entry = next(o for o in report["optimizers"] if o["name"] == "report-match")
    assert entry == {
        "name": "report-match",
        "steps": 1,
        "skipped_steps": 0,
        "last_global_norm": 5.0,
        "history": entry["history"],
    }
    assert entry["history"]["global"]["global_norm_max"] == [5.0]
    from gradtel import reporting

    reporting.write(str(tmp_path / "r.json"), report)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    assert handle.totals()[0] == 1
    gradtel.uninstrument(opt)


def test_partial_missing_warning_names_each_cause_once():
    from gradtel.handle import MissingGradientWarning

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="used")])
    idle = keras.layers.Dense(2, name="idle")
    idle.build((None, 4))
    variables = model.trainable_variables + idle.trainable_variables
    opt = keras.optimizers.SGD(0.1)
    gradtel.instrument(opt, name="partial", start_exporter=False)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(tf.ones((2, 4))) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))

    with pytest.warns(MissingGradientWarning) as caught:
        for _ in range(3):
            step()
    mine = [str(w.message) for w in caught if w.category is MissingGradientWarning]
    assert len(mine) == 1
    assert "idle/kernel: unused" in mine[0] and "idle/bias: unused" in mine[0]
    assert "used/kernel" not in mine[0]
    gradtel.uninstrument(opt)


def test_report_finds_variables_no_optimizer_receives():
    model = keras.Sequential([keras.Input((3,)), UntrackedScale(name="scaled")])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        np.ones((4, 3)),
        np.ones((4, 1)),
        verbose=0,
        callbacks=[GradientTelemetry(name="not-optimized", start_exporter=False)],
    )
    report = gradtel.report()
    findings = {f["category"]: f["variables"] for f in report["findings"]}
    assert [n for n in findings["untracked_variable"] if n.endswith("scaled/untracked_scale")]
    assert not any("kernel" in name for name in findings["untracked_variable"]), findings["untracked_variable"]
    assert runner.verdict(report) == runner.EXIT_UNHEALTHY


def test_variables_of_an_optimizer_long_gone_are_not_reported_not_optimized():
    """The model outlives its optimizer, whose handle is retired and then dropped (more than MAX_RETIRED_HANDLES
    optimizers came and went): its variables did train, so no not_optimized finding names them."""
    from gradtel import instrumenting, registry

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="outlived")])
    opt = keras.optimizers.SGD(0.1)
    gradtel.instrument(opt, name="gone-optimizer", start_exporter=False)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.ones((1, 2))))
    opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    gradtel.uninstrument(opt)
    for i in range(registry.MAX_RETIRED_HANDLES + 1):
        churn = keras.optimizers.SGD(0.1)
        gradtel.instrument(churn, name=f"churn-{i}", start_exporter=False)
        gradtel.uninstrument(churn)
    assert "gone-optimizer" not in [h.name for h in instrumenting.handles()]  # the premise: dropped
    report = gradtel.report()
    names = [n for f in report["findings"] + report["notes"] for n in f["variables"]]
    assert not [n for n in names if "outlived" in n], names
