"""Variables that influence the loss but reach no optimizer: an untracked plain tf.Variable on a Keras 3 layer is a
bug that fails ``gradtel check``; a frozen feature extractor or a target network is only a note; ``--expect-missing``
silences either."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import tensorflow as tf
import tf_keras

import gradtel
from gradtel import runner
from tests.core.helpers import gradtel_script

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras, tensorflow as tf
    mode = sys.argv[1]
    x = np.ones((8, 3), "float32")
    print("training starts")

    class Quantizer(keras.layers.Layer):
        # As in the keras-io VQ-VAE: the codebook is a plain tf.Variable on a Keras 3 layer, which Keras 3 does
        # not track, so it is not in model.trainable_variables.
        def build(self, input_shape):
            self.embeddings = tf.Variable(tf.ones((input_shape[-1], 2)), name="embeddings_vq")

        def call(self, inputs):
            return tf.matmul(inputs, self.embeddings)

    if mode == "untracked":
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="enc"), Quantizer(name="vq")])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, np.ones((8, 2), "float32"), batch_size=4, epochs=1, verbose=0)
    else:
        # Neural style transfer: the image is optimized through a feature extractor whose weights stay trainable
        # but go to no optimizer. DQN/DDPG: a target network read in the loss and updated by assign.
        extractor = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="features")], name="extractor")
        q_net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="q")], name="q_net")
        target = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="q")], name="target")
        image = tf.Variable(tf.ones((1, 3)), name="image")
        image_opt, q_opt = keras.optimizers.Adam(name="image_opt"), keras.optimizers.Adam(name="q_opt")

        @tf.function
        def step():
            with tf.GradientTape(persistent=True) as tape:
                style_loss = tf.reduce_mean(tf.square(extractor(image) - 1.0))
                td_loss = tf.reduce_mean(tf.square(q_net(x) - (1.0 + 0.9 * target(x))))
            image_opt.apply([tape.gradient(style_loss, image)], [image])
            q_opt.apply(tape.gradient(td_loss, q_net.trainable_variables), q_net.trainable_variables)
            for t, s in zip(target.variables, q_net.variables):
                t.assign(0.9 * t + 0.1 * s)

        for _ in range(3):
            step()
""")
EXTRACTOR = ["extractor/features/bias", "extractor/features/kernel"]
TARGET = ["target/q/bias", "target/q/kernel"]


def _gradtel(tmp_path, *args: str, mode: str) -> subprocess.CompletedProcess:
    return gradtel_script(tmp_path, SCRIPT, *args, mode=mode)


def _groups(entries: list[dict]) -> dict[str, list[str]]:
    return {entry["category"]: entry["variables"] for entry in entries}


@pytest.mark.slow
def test_an_untracked_variable_on_a_keras3_layer_fails_the_check(tmp_path):
    done = _gradtel(tmp_path, "check", "--json", mode="untracked")
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert _groups(report["findings"]) == {"untracked_variable": ["sequential/vq/embeddings_vq"]}
    assert report["notes"] == []
    assert {v["name"]: v["status"] for v in report["variables"]} == {
        "sequential/enc/kernel": "ok",
        "sequential/enc/bias": "ok",
    }


@pytest.mark.slow
def test_an_untracked_variable_declared_expected_passes_the_check(tmp_path):
    done = _gradtel(tmp_path, "check", "--json", "--expect-missing", "*/embeddings_vq", mode="untracked")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _groups(json.loads(done.stdout)["findings"]) == {"expected_missing": ["sequential/vq/embeddings_vq"]}


@pytest.mark.slow
def test_run_names_the_untracked_variable_on_stderr(tmp_path):
    done = _gradtel(tmp_path, "run", mode="untracked")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = [line for line in done.stderr.splitlines() if line.startswith("gradtel: ")]
    assert "gradtel: untracked_variable: sequential/vq/embeddings_vq" in summary, summary


@pytest.mark.slow
def test_a_frozen_extractor_and_a_target_network_are_notes_not_faults(tmp_path):
    done = _gradtel(tmp_path, "check", "--steps", "2", "--report", str(tmp_path / "report.json"), mode="frozen")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["findings"] == []
    assert _groups(report["notes"]) == {"not_optimized": EXTRACTOR + TARGET}
    assert "How to fix" not in done.stdout
    assert f"Note, not optimized: {', '.join(EXTRACTOR + TARGET)}." in done.stdout


@pytest.mark.slow
def test_expect_missing_moves_a_note_to_expected_and_run_prints_the_rest(tmp_path):
    report_path = tmp_path / "report.json"
    done = _gradtel(tmp_path, "run", "--report", str(report_path), "--expect-missing", "extractor/*", mode="frozen")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert _groups(report["findings"]) == {"expected_missing": EXTRACTOR}
    assert _groups(report["notes"]) == {"not_optimized": TARGET}
    assert runner.verdict(report) == runner.EXIT_HEALTHY
    summary = [line for line in done.stderr.splitlines() if line.startswith("gradtel: ")]
    assert summary == [
        "gradtel: no unhealthy gradient in 3 variables (optimizers: image_opt (3 steps), q_opt (3 steps))",
        f"gradtel: note, not_optimized (no fault if intended): {', '.join(TARGET)}",
    ], summary


class _RawAttribute(tf_keras.layers.Layer):
    """tf_keras tracks a plain tf.Variable set as a layer attribute: it is in the layer's trainable variables."""

    def build(self, input_shape):
        self.w = tf.Variable(tf.ones((input_shape[-1], 1)), name="raw_w")

    def call(self, inputs):
        return tf.matmul(inputs, self.w)


def test_a_tf_keras_attribute_left_out_of_the_optimizer_is_a_note():
    trained, frozen = _RawAttribute(name="trained"), _RawAttribute(name="frozen_raw")
    x = tf.ones((2, 3))
    trained(x), frozen(x)
    assert [v.name for v in frozen.trainable_variables] == ["frozen_raw/raw_w:0"]  # the premise: tracked
    opt = tf_keras.optimizers.SGD(0.1)
    gradtel.instrument(opt, name="tf-keras-notes", start_exporter=False)
    try:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(trained(x) * frozen(x))
        variables = trained.trainable_variables
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        report = gradtel.report()
    finally:
        gradtel.uninstrument(opt)
    # The report is the process's: variables of earlier tests may be in it too; this one is a note, not a fault.
    assert "frozen_raw/raw_w" not in _groups(report["findings"]).get("untracked_variable", [])
    assert "frozen_raw/raw_w" in _groups(report["notes"])["not_optimized"]


def test_a_left_out_clone_sharing_its_paths_with_the_trained_model_is_named_apart():
    """keras.models.clone_model keeps the layer names: the clone's variables have the trained ones' paths. A note
    naming the bare path would name a variable the optimizer does get."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="twin_dense")], name="twin_model")
    clone = keras.models.clone_model(model)
    assert [v.path for v in clone.trainable_variables] == [v.path for v in model.trainable_variables]
    opt = keras.optimizers.SGD(0.1)
    gradtel.instrument(opt, name="clone-notes", start_exporter=False)
    try:
        x = tf.ones((2, 3))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) - clone(x))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        report = gradtel.report()
    finally:
        gradtel.uninstrument(opt)
    ours = {v["name"] for v in report["variables"] if v["optimizer"] == "clone-notes"}
    assert ours == {"twin_model/twin_dense/kernel", "twin_model/twin_dense/bias"}
    noted = set(_groups(report["notes"])["not_optimized"])
    assert {"twin_model/twin_dense/kernel#2", "twin_model/twin_dense/bias#2"} <= noted and not noted & ours
