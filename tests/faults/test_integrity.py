"""Data integrity: counters never go backwards, one scrape is one snapshot, the report and the metrics tell the
same story, and checkpoints cross between gradtel and plain processes bit for bit.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest

from tests.faults.helpers import (
    GRADTEL,
    Processes,
    counter_samples,
    free_port,
    parse,
    progress,
    read_json,
    scrape_body,
    trainee,
    values,
    wait_for,
)

#: A few more trained variables than the trainee's three, so the report/metrics comparison covers a real table.
EXTRA = 20


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """A ``gradtel run --report`` training job scraped back to back while it trains, then once more after it
    stopped (the endpoint stays up while the script holds); returns (scrapes, final scrape, report, steps)."""
    tmp = tmp_path_factory.mktemp("scraped")
    port = free_port()
    prog, stop, done, hold, report = (tmp / n for n in ("progress", "stop", "done", "hold", "report.json"))
    group = Processes(tmp)
    try:
        proc = group.start(
            trainee(
                "--steps",
                "0",
                "--stop",
                str(stop),
                "--progress",
                str(prog),
                "--done",
                str(done),
                "--hold",
                str(hold),
                "--extra",
                str(EXTRA),
                report=str(report),
            ),
            {"OTEL_EXPORTER_PROMETHEUS_PORT": str(port), "GRADTEL_RUN_ID": "integrity", "GRADTEL_MAX_ABS": "true"},
            name="scraped",
        )
        wait_for(lambda: progress(prog) > 0 or proc.poll() is not None, 120, "the first steps")
        scrapes = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            scrapes.append(parse(scrape_body(port)))
        stop.touch()
        wait_for(done.exists, 60, "training to stop")
        steps = int(done.read_text())
        final: dict = {}

        def final_state_served() -> bool:  # once the endpoint's next collection is due (exposition.py)
            final.update(parse(scrape_body(port)))
            return values(final, "gradtel_steps") == {(None, "sgd"): steps}

        wait_for(final_state_served, 30, "a scrape of the final state")
        hold.touch()
        assert group.wait(proc, 60) == 0, group.output(proc)[1][-3000:]
        yield scrapes, final, read_json(report), steps
    finally:
        group.close()


@pytest.mark.slow
def test_counters_never_go_backwards_within_a_run(scraped_run):
    scrapes, final, _, steps = scraped_run
    assert len(scrapes) >= 10
    previous: dict = {}
    for n, scrape in enumerate([*scrapes, final]):
        current = counter_samples(scrape)
        assert set(previous) <= set(current), f"scrape {n}: a counter series disappeared"
        backwards = {k: (previous[k], v) for k, v in current.items() if k in previous and v < previous[k]}
        assert backwards == {}, f"scrape {n}: counters went backwards"
        previous = current
    assert values(final, "gradtel_steps") == {(None, "sgd"): steps}


def test_every_scrape_is_one_consistent_snapshot(exporter):
    """``cut`` is missing and ``dead`` zero at EVERY step, so within one scrape their counters equal the steps.

    Training runs flat out in a thread while scrapes start at every phase of the exporter's snapshot refresh
    (a second scrape timed to begin 0.1 ... 0.9 of a scrape's duration before the refresh is due).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import gradtel

    port = exporter(run_id="snapshot").endpoint[1]
    cut, dead = keras.Variable(np.zeros(1, "float32"), name="cut"), keras.Variable(np.ones(2, "float32"), name="dead")
    extra = [keras.Variable(np.ones(2, "float32"), name=f"e{i}") for i in range(200)]
    optimizer = keras.optimizers.SGD(0.0)
    gradtel.instrument(optimizer, name="snapshot")
    grads = [None, tf.zeros(2)] + [tf.ones(2)] * len(extra)

    @tf.function
    def step() -> None:
        optimizer.apply_gradients(zip(grads, [cut, dead, *extra], strict=True))

    step()
    stop = threading.Event()
    trainer = threading.Thread(target=lambda: [step() for _ in iter(stop.is_set, True)], daemon=True)
    trainer.start()
    torn = []
    try:
        for attempt in range(10):
            started = time.monotonic()
            scrapes = [parse(scrape_body(port))]
            took = time.monotonic() - started
            time.sleep(max(0.0, started + 0.5 - took * (0.1 + 0.8 * attempt / 9) - time.monotonic()))
            scrapes.append(parse(scrape_body(port)))
            for scrape in scrapes:
                counts = (
                    values(scrape, "gradtel_steps", optimizer="snapshot")[(None, "snapshot")],
                    values(scrape, "gradtel_gradient_missing", optimizer="snapshot")[("cut", "snapshot")],
                    values(scrape, "gradtel_gradient_zero", optimizer="snapshot")[("dead", "snapshot")],
                )
                if len(set(counts)) != 1:
                    torn.append(counts)
    finally:
        stop.set()
        trainer.join(30)
        gradtel.uninstrument(optimizer)
    assert torn == [], f"{len(torn)} scrapes mixed two snapshots (steps, missing, zero): {torn[:5]}"


@pytest.mark.slow
def test_the_report_and_the_final_scrape_agree(scraped_run):
    _, final, report, steps = scraped_run
    assert report["run_id"] == "integrity"
    (optimizer,) = report["optimizers"]
    assert (
        (optimizer["name"], optimizer["steps"])
        == ("sgd", steps)
        == ("sgd", values(final, "gradtel_steps")[(None, "sgd")])
    )
    assert optimizer["last_global_norm"] == pytest.approx(
        values(final, "gradtel_gradient_global_norm")[(None, "sgd")], rel=1e-12
    )
    variables = {v["name"]: v for v in report["variables"]}
    assert len(variables) == 3 + EXTRA
    for metric, field in [
        ("gradtel_gradient_zero", "zero_steps"),
        ("gradtel_gradient_nonfinite", "nonfinite_steps"),
        ("gradtel_gradient_missing", "missing_steps"),
        ("gradtel_gradient_norm", "last_norm"),
        ("gradtel_gradient_max_abs", "last_max_abs"),
    ]:
        scraped = {name: value for (name, _), value in values(final, metric).items()}
        reported = {name: v[field] for name, v in variables.items() if v[field]}
        assert {k: v for k, v in scraped.items() if v} == pytest.approx(reported, rel=1e-12), metric
    assert all(v["steps"] == steps for v in variables.values())


# --- checkpoints across processes ----------------------------------------------------------------------------
CHECKPOINT_SCRIPT = textwrap.dedent('''
    """write DIR | read DIR | continue IN OUT: a small Keras model's tf.train.Checkpoint and .keras file."""
    import os, sys
    import keras, numpy as np, tensorflow as tf

    def make():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    def state(model):
        return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]

    def train(model, steps):
        x = tf.constant(np.arange(12, dtype="float32").reshape(4, 3) / 7.0)
        opt, variables = model.optimizer, model.trainable_variables

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - 1.0))
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

        for _ in range(steps):
            step()

    def save(model, out):
        os.makedirs(out, exist_ok=True)
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(os.path.join(out, "ckpt"))
        model.save(os.path.join(out, "model.keras"))
        np.savez(os.path.join(out, "state.npz"), *state(model))
        keys = [k for k, _ in tf.train.list_variables(os.path.join(out, "ckpt"))]
        assert not [k for k in keys if "gradtel" in k], keys

    def check(src):
        expected = list(np.load(os.path.join(src, "state.npz")).values())
        model = make()
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
            os.path.join(src, "ckpt")).assert_existing_objects_matched()
        loaded = keras.models.load_model(os.path.join(src, "model.keras"))
        for name, got in (("checkpoint", state(model)), (".keras", state(loaded))):
            assert len(got) == len(expected), (name, len(got), len(expected))
            for a, b in zip(got, expected):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, a, b)
        return model

    mode = sys.argv[1]
    if mode == "write":
        model = make()
        train(model, 3)
        save(model, sys.argv[2])
    elif mode == "read":
        check(sys.argv[2])
    else:
        model = check(sys.argv[2])
        train(model, 3)
        save(model, sys.argv[3])
        import gradtel.instrumenting
        print("measured steps:", sum(h.totals()[0] for h in gradtel.instrumenting.handles()))
    print("ok", mode)
''')


@pytest.mark.slow
def test_checkpoints_cross_between_gradtel_and_plain_processes_bit_for_bit(procs, tmp_path):
    """plain writes -> a gradtel-run process restores it exactly, trains instrumented, writes -> plain restores."""
    script = tmp_path / "ckpt.py"
    script.write_text(CHECKPOINT_SCRIPT)
    plain_dir, gradtel_dir = str(tmp_path / "plain"), str(tmp_path / "gradtel")
    env = {"OTEL_METRICS_EXPORTER": "none"}
    for argv in (
        [sys.executable, str(script), "write", plain_dir],
        [GRADTEL, "run", "--", sys.executable, str(script), "continue", plain_dir, gradtel_dir],
        [sys.executable, str(script), "read", gradtel_dir],
    ):
        proc = procs.start(argv, env, name="ckpt")
        status = procs.wait(proc, 180)
        out, err = procs.output(proc)
        assert status == 0 and "\nok " in f"\n{out}", err[-3000:]
        if "continue" in argv:
            assert "measured steps: 3" in out, out  # the middle process really ran instrumented
