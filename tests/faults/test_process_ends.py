"""However a ``gradtel run`` process ends, its report is whole, OTLP gets the final counts, the status is kept.

tests/core/test_run.py checks the report's content for exit/raise/signals; here every ending is checked for
the properties that matter when things go wrong: a reader polling the report path during the whole run never
sees a half-written file (it sees the previous report, then the new one), the OTLP receiver gets the final
counts from the shutdown flush alone (the periodic push is set to 60 s, longer than the run), the process
ends within a bounded time even when the collector is down, and the exit status is the script's own.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.faults.helpers import GRADTEL, Processes, read_json, trainee, wait_for

STEPS = 40
#: How a run ends -> (the trainee's --then, a signal sent after training, the expected exit status).
ENDINGS = {
    "normal": ("ok", None, 0),
    "exception": ("raise", None, 1),
    "sys.exit(3)": ("exit3", None, 3),
    "SIGINT": ("sleep", signal.SIGINT, -signal.SIGINT),
    "SIGTERM": ("sleep", signal.SIGTERM, -signal.SIGTERM),
}
OLD_REPORT = {"schema": "gradtel.report/v1", "previous": True}


class ReportWatcher:
    """Reads the report path as fast as it can from a thread and keeps every read that was not valid JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bad: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.path.read_text()
                json.loads(text)
            except FileNotFoundError:
                self.bad.append("<missing>")  # os.replace never removes the old file first
            except ValueError:
                self.bad.append(text[:200])
            self.reads += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _run_to_the_end(
    procs: Processes, tmp_path: Path, otlp_endpoint: str, ending: str, extra_env: dict[str, str] | None = None
) -> tuple[int, float, ReportWatcher, Path]:
    """One trainee under ``gradtel run --report``, ended as ``ending`` says; returns status, seconds it took to
    end after training finished, the watcher and the report path."""
    then, sig, _ = ENDINGS[ending]
    report = tmp_path / "report.json"
    report.write_text(json.dumps(OLD_REPORT))
    watcher = ReportWatcher(report)
    done = tmp_path / "done"
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        "GRADTEL_RUN_ID": f"end-{then}",
        **(extra_env or {}),
    }
    proc = procs.start(
        trainee("--steps", str(STEPS), "--done", str(done), "--then", then, report=str(report)), env, name="ending"
    )
    try:
        wait_for(lambda: done.exists() or proc.poll() is not None, 120, "training to finish")
        assert done.exists(), procs.output(proc)[1][-3000:]
        finished = time.monotonic()
        if sig is not None:
            time.sleep(0.3)  # let the script reach its sleep
            proc.send_signal(sig)
        status = procs.wait(proc, 60)
        return status, time.monotonic() - finished, watcher, report
    finally:
        watcher.stop()


@pytest.mark.slow
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_ending_writes_a_whole_report_flushes_otlp_and_keeps_the_status(procs, tmp_path, otlp, ending):
    otlp.start()
    status, _, watcher, report_path = _run_to_the_end(procs, tmp_path, otlp.endpoint, ending)
    _out, err = procs.output(procs._procs[-1])

    assert status == ENDINGS[ending][2], err[-3000:]
    # Atomic: thousands of reads during the run, every one a whole JSON document (the old report or the new).
    assert watcher.reads > 100
    assert watcher.bad == []
    report = read_json(report_path)
    assert "previous" not in report and report["schema"] == "gradtel.report/v1"
    variables = {v["name"]: v for v in report["variables"]}
    assert report["optimizers"][0]["steps"] == STEPS
    assert (variables["cut"]["missing_steps"], variables["dead"]["zero_steps"], variables["w"]["steps"]) == (
        STEPS,
        STEPS,
        STEPS,
    )
    assert not list(tmp_path.glob(".gradtel-report-*"))  # no temporary file left behind

    # OTLP: with a 60 s interval only the shutdown flush can have sent anything, and it carries the final counts.
    assert otlp.received, f"no OTLP export at exit:\n{err[-3000:]}"
    final = otlp.received[-1][1]
    assert final[("gradtel_steps", None)] == STEPS
    assert final[("gradtel_gradient_missing", "cut")] == STEPS
    assert final[("gradtel_gradient_zero", "dead")] == STEPS
    assert final[("gradtel_gradient_norm", "w")] == pytest.approx(variables["w"]["last_norm"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["normal", "SIGTERM"])
def test_a_dead_collector_at_exit_costs_a_bounded_wait_and_changes_nothing_else(procs, tmp_path, otlp, ending):
    """The receiver never starts: the final flush fails after OTEL_EXPORTER_OTLP_TIMEOUT, nothing hangs."""
    status, took, watcher, report_path = _run_to_the_end(
        procs, tmp_path, otlp.endpoint, ending, {"OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
    )
    assert status == ENDINGS[ending][2], procs.output(procs._procs[-1])[1][-3000:]
    assert took < 30, f"the process took {took:.1f}s to end with the collector down"
    assert watcher.bad == []
    assert read_json(report_path)["optimizers"][0]["steps"] == STEPS


@pytest.mark.slow
def test_a_late_collector_gets_the_final_counts_from_the_shutdown_flush(procs, tmp_path, otlp):
    """The collector comes up only after training: the one push at exit still reaches it with every step."""
    done, hold = tmp_path / "done", tmp_path / "hold"
    proc = procs.start(
        trainee("--steps", str(STEPS), "--done", str(done), "--hold", str(hold)),
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        },
        name="late",
    )
    wait_for(lambda: done.exists() or proc.poll() is not None, 120, "training to finish")
    otlp.start()
    hold.touch()
    assert procs.wait(proc, 60) == 0, procs.output(proc)[1][-3000:]
    assert otlp.steps() == [STEPS]


def test_the_shutdown_flush_reads_the_final_state_even_right_after_a_push(otlp, monkeypatch):
    """A push, one more step, then exit at once: the final push must include that step."""
    import keras
    import numpy as np
    import tensorflow as tf

    import gradtel
    from gradtel import export
    from gradtel.config import Config

    otlp.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    export.shutdown()
    started = export.ensure_started(Config(exporters=("otlp",), run_id="final-flush"))
    var = keras.Variable(np.ones(2, "float32"), name="w")
    optimizer = keras.optimizers.SGD(0.0)
    gradtel.instrument(optimizer, name="final-flush")
    try:
        optimizer.apply_gradients([(tf.constant([3.0, 4.0]), var)])
        started.force_flush()
        optimizer.apply_gradients([(tf.constant([3.0, 4.0]), var)])
    finally:
        export.shutdown()
        gradtel.uninstrument(optimizer)
    assert otlp.steps() == [1, 2]


def test_gradtel_run_adds_no_error_output_to_a_plain_script(procs):
    proc = procs.start([GRADTEL, "run", "--", sys.executable, "-c", "print('hello')"], name="plain")
    assert procs.wait(proc, 60) == 0
    out, err = procs.output(proc)
    assert out == "hello\n"
    assert err == ""


def test_the_exit_flush_shuts_the_provider_down_once(procs, otlp):
    """No TensorFlow needed: the export alone, started under ``gradtel run`` and flushed at exit."""
    otlp.start()
    code = "from gradtel import export; export.ensure_started(); print('hello')"
    proc = procs.start(
        [GRADTEL, "run", "--", sys.executable, "-c", code],
        {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint},
        name="once",
    )
    assert procs.wait(proc, 60) == 0
    _, err = procs.output(proc)
    assert "shutdown can only be called once" not in err, err
