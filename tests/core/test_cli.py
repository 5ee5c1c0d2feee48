"""The command line and zero-code instrumentation, as users run them: real processes, real scrapes."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.core.helpers import free_port

BIN = pathlib.Path(sys.executable).parent
#: The tests default to OTEL_METRICS_EXPORTER=none (conftest); these processes export as users would.
ENV = {**{k: v for k, v in os.environ.items() if k != "OTEL_METRICS_EXPORTER"}, "TF_CPP_MIN_LOG_LEVEL": "2"}


def wait_for_missing(port: int, proc: subprocess.Popen, timeout: float = 90) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            time.sleep(0.5)
            continue
        missing = {
            s.labels["variable"]: s.value
            for f in text_string_to_metric_families(body)
            if f.name == "gradtel_gradient_missing"
            for s in f.samples
        }
        if missing:
            return missing
        time.sleep(0.5)
    raise AssertionError("no gradtel_gradient_missing_total series appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_serves_the_disconnected_head_while_training_and_prints_the_table(sig):
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "gradtel", "demo", "--steps", "0", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        missing = wait_for_missing(port, proc)
        assert set(missing) == {"aux_head/kernel", "aux_head/bias"}
        assert all(v >= 1 for v in missing.values())
    finally:
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name}" in out
    assert f"metrics at http://127.0.0.1:{port}/metrics" in out
    table = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("adam ")}
    assert table["aux_head/kernel"][2] == "missing"
    assert table["encoder/kernel"][2] == "ok"


@pytest.mark.slow
def test_opentelemetry_instrument_turns_gradtel_on_without_code_changes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import keras, numpy as np
        from gradtel import instrumenting
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), loss="mse")
        model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, epochs=2, verbose=0)
        print([(h.name, h.active, h.totals()[0]) for h in instrumenting.handles()])
    """)
    )
    result = subprocess.run(
        [BIN / "opentelemetry-instrument", sys.executable, script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "OTEL_METRICS_EXPORTER": "none"},
    )
    assert result.returncode == 0, result.stderr
    handles = eval(result.stdout.strip().splitlines()[-1])  # a list literal printed by the script above
    # The loss-scale wrapper took over from its inner SGD: 4 steps counted once, by the outer optimizer only.
    assert [(active, steps) for _, active, steps in handles] == [(False, 0), (True, 4)]


def test_demo_stops_after_the_first_signal_and_aborts_on_the_second():
    from gradtel.demo import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt), stop.installed():
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT  # a request, not an exception
        signal.raise_signal(signal.SIGINT)  # the second one restores Python's handler: KeyboardInterrupt
        time.sleep(1)  # not reached
    assert signal.getsignal(signal.SIGINT) is before
