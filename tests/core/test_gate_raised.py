"""The report and the gate keep the diagnosis when Keras raises 'No gradients provided for any variable', in every
mode; ``check --json`` prints nothing but the JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.core.test_cli import BIN, ENV

# Every gradient is None: the loss is computed from the labels only. Keras raises at the first step (while the
# step is traced in graph modes), so no step ever runs. The script prints before training, as scripts do.
SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras, tensorflow as tf
    mode = sys.argv[1]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d1"), keras.layers.Dense(1, name="d2")])
    x, y = np.ones((16, 4), "float32"), np.ones((16, 1), "float32")
    print("training starts")

    def labels_only(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true))  # LOSS LINE

    if mode in ("fit", "fit_eager", "fit_xla"):
        model.compile(optimizer="adam", loss=labels_only, run_eagerly=mode == "fit_eager",
                      jit_compile=mode == "fit_xla")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    else:
        optimizer = keras.optimizers.Adam()

        def step():
            with tf.GradientTape() as tape:
                loss = labels_only(y, model(x))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

        step = tf.function(step, jit_compile=mode == "loop_xla") if mode != "loop_eager" else step
        step()
""")
LOSS_LINE = next(n for n, text in enumerate(SCRIPT.splitlines(), 1) if "# LOSS LINE" in text)
VARIABLES = {"d1/kernel", "d1/bias", "d2/kernel", "d2/bias"}


def _run(tmp_path, *args: str, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**ENV, "OTEL_METRICS_EXPORTER": "none"}
    return subprocess.run([BIN / "gradtel", *args, "--", sys.executable, str(script), mode], env=env,
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fit", "fit_eager", "fit_xla", "loop_graph", "loop_eager", "loop_xla"])
def test_a_step_that_raises_keeps_its_diagnosis_in_the_report_and_fails_the_gate(tmp_path, mode):
    done = _run(tmp_path, "check", "--json", "--report", str(tmp_path / "report.json"), mode=mode)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "training starts" in done.stderr and "training starts" not in done.stdout
    report = json.loads(done.stdout)  # stdout holds the JSON alone
    assert report == json.loads((tmp_path / "report.json").read_text()) | {"generated_at": report["generated_at"]}
    (optimizer,) = report["optimizers"]
    assert optimizer["raised"].startswith("No gradients provided for any variable")
    variables = {v["name"].split("/", 1)[1]: v for v in report["variables"]}
    assert set(variables) == VARIABLES
    for v in variables.values():
        assert v["status"] == "missing" and not v["expected"]
        assert v["cause"]["category"] == "loss_disconnected"
        assert v["cause"]["location"].endswith(f"train.py:{LOSS_LINE}")
    (finding,) = report["findings"]
    assert finding["category"] == "loss_disconnected" and len(finding["variables"]) == 4
