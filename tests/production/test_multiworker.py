"""Multi-worker and tf_keras distribution, as users run them: real processes, real collectives, real scrapes.

- MultiWorkerMirroredStrategy with two worker processes on loopback (``mw_worker.py``): every worker exports,
  its TF_CONFIG identity is on its series (``worker``) and on ``target_info``; by default only the chief
  exports per-variable series, every worker its summary; ``GRADTEL_VARIABLE_SERIES_WORKERS=all`` makes every
  worker export per-variable series. The all-reduced gradients are the same on both workers and equal the
  full-batch gradients computed without any strategy.
- tf_keras (legacy Keras 2) under MirroredStrategy with two logical CPUs (``mw_tf_keras_mirrored.py``, in a fresh
  process so the devices are configured before TensorFlow starts).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.core.helpers import free_port

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
STEPS = 3
RUN_ID = "mw-test-run"
HEALTHY = ("hidden/kernel", "hidden/bias", "main/kernel", "main/bias")
DISCONNECTED = ("aux/kernel", "aux/bias")
PER_VARIABLE = (
    "gradtel_gradient_norm",
    "gradtel_gradient_max_abs",
    "gradtel_gradient_missing_total",
    "gradtel_gradient_zero_total",
    "gradtel_gradient_nonfinite_total",
)
#: Start-up (TensorFlow import, collective set-up) plus STEPS steps; a peer that dies makes MWMS hang, so every
#: wait below is bounded.
START_TIMEOUT_S = 120


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without its exporter switch-off (tests/conftest.py) or any gradtel/TF_CONFIG
    setting inherited from the shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OTEL_METRICS_EXPORTER", "TF_CONFIG", "TF_USE_LEGACY_KERAS") and not k.startswith("GRADTEL_")
    }
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **extra}


def scrape(port: int) -> list:
    """Every sample of the endpoint (counters keep their ``_total`` sample names)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(body) for s in family.samples]


def values(samples: list, name: str, **labels: str) -> list[float]:
    return [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def one(samples: list, name: str, **labels: str) -> float:
    found = values(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0]


class Job:
    """Two MWMS worker processes; ``stop`` releases them and kills whatever is still running."""

    def __init__(self, out: pathlib.Path, series_workers: str | None) -> None:
        self.out = out
        self.metrics_ports = [free_port(), free_port()]
        self.procs: list[subprocess.Popen] = []
        self.logs = [out / f"worker-{i}.log" for i in range(2)]
        self.series_workers = series_workers

    def start(self) -> None:
        workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
        for i in range(2):
            env = base_env(
                TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}),
                OTEL_EXPORTER_PROMETHEUS_PORT=str(self.metrics_ports[i]),
                GRADTEL_RUN_ID=RUN_ID,
            )
            if self.series_workers is not None:
                env["GRADTEL_VARIABLE_SERIES_WORKERS"] = self.series_workers
            command = [sys.executable, str(HERE / "mw_worker.py"), str(self.out), str(STEPS)]
            with open(self.logs[i], "wb") as log:
                self.procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))

    def log_tail(self) -> str:
        return "\n".join(
            f"--- worker {i} (rc={p.poll()}):\n" + self.logs[i].read_text(errors="replace")[-3000:]
            for i, p in enumerate(self.procs)
        )

    def wait_trained(self) -> list[dict]:
        """Both workers' reports, once both have trained (their endpoints stay up until ``stop``)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        done = [self.out / f"done-{i}.json" for i in range(2)]
        while not all(d.exists() for d in done):
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError("a worker ended before training finished\n" + self.log_tail())
            if time.monotonic() > deadline:
                raise AssertionError(f"workers did not train within {START_TIMEOUT_S}s\n" + self.log_tail())
            time.sleep(0.2)
        return [json.loads(d.read_text()) for d in done]

    def stop(self) -> None:
        (self.out / "release").touch()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)


@pytest.fixture
def job(tmp_path):
    jobs: list[Job] = []

    def start(series_workers: str | None) -> Job:
        started = Job(tmp_path, series_workers)
        jobs.append(started)  # before the processes start: the teardown stops whatever did start
        started.start()
        return started

    yield start
    for started in jobs:
        started.stop()


def assert_identity(samples: list, index: int) -> None:
    """Every gradtel series carries this worker's label and the run; target_info its TF_CONFIG task."""
    gradtel_samples = [s for s in samples if s.name.startswith("gradtel_")]
    assert gradtel_samples
    assert {s.labels.get("worker") for s in gradtel_samples} == {f"worker:{index}"}
    assert {s.labels.get("run") for s in gradtel_samples} == {RUN_ID}
    (info,) = [s for s in samples if s.name == "target_info"]
    assert info.labels["gradtel_task_type"] == "worker"
    assert info.labels["gradtel_task_index"] == str(index)
    assert info.labels["gradtel_run_id"] == RUN_ID


def assert_summary(samples: list, index: int) -> float:
    """The low-cardinality summary every worker exports; returns the global norm."""
    labels = {"worker": f"worker:{index}", "optimizer": "mw"}
    assert one(samples, "gradtel_steps_total", **labels) == STEPS
    assert one(samples, "gradtel_variables", state="ok", **labels) == len(HEALTHY)
    assert one(samples, "gradtel_variables", state="missing", **labels) == len(DISCONNECTED)
    return one(samples, "gradtel_gradient_global_norm", **labels)


def assert_per_variable(samples: list, index: int, reference: dict[str, float | None]) -> None:
    labels = {"worker": f"worker:{index}", "optimizer": "mw"}
    for name in HEALTHY:
        assert one(samples, "gradtel_gradient_norm", variable=name, **labels) == pytest.approx(
            reference[name], rel=1e-5
        )
        assert one(samples, "gradtel_gradient_zero_total", variable=name, **labels) == 0
    for name in DISCONNECTED:
        assert reference[name] is None  # disconnected in the independent computation too
        assert one(samples, "gradtel_gradient_missing_total", variable=name, expected="false", **labels) == STEPS
        assert values(samples, "gradtel_gradient_norm", variable=name) == []
    assert not values(samples, "gradtel_gradient_missing_total", variable="hidden/kernel")


@pytest.mark.slow
@pytest.mark.parametrize("series_workers", [None, "all"], ids=["chief-default", "all"])
def test_multi_worker_mirrored_exports_per_worker_with_chief_only_variable_series(job, series_workers):
    running = job(series_workers)
    reports = running.wait_trained()
    scrapes = [scrape(port) for port in running.metrics_ports]

    assert [r["handle_steps"] for r in reports] == [STEPS, STEPS]
    # The all-reduce kept the replicas in sync: the same weights on both workers after STEPS updates.
    assert reports[0]["weights_checksum"] == pytest.approx(reports[1]["weights_checksum"], rel=1e-6)
    reference = reports[0]["reference"]  # full-batch gradients at the last step's weights, no strategy
    reference_global = math.sqrt(sum(reference[n] ** 2 for n in HEALTHY))

    norms = []
    for index, samples in enumerate(scrapes):
        assert_identity(samples, index)
        norms.append(assert_summary(samples, index))
    # Identical all-reduced gradients on both workers, equal to the full-batch ones.
    assert norms[0] == pytest.approx(norms[1], rel=1e-9)
    assert norms[0] == pytest.approx(reference_global, rel=1e-5)

    assert_per_variable(scrapes[0], 0, reference)  # the chief always exports per-variable series
    if series_workers == "all":
        assert_per_variable(scrapes[1], 1, reference)
        for name in HEALTHY:
            assert one(scrapes[1], "gradtel_gradient_norm", variable=name) == pytest.approx(
                one(scrapes[0], "gradtel_gradient_norm", variable=name), rel=1e-9
            )
    else:
        assert not [s for s in scrapes[1] if s.name in PER_VARIABLE or "variable" in s.labels]


@pytest.mark.slow
def test_tf_keras_mirrored_reports_all_reduced_norms_and_the_disconnected_head():
    result = subprocess.run(
        [sys.executable, str(HERE / "mw_tf_keras_mirrored.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=base_env(TF_USE_LEGACY_KERAS="1", OTEL_METRICS_EXPORTER="none"),
    )
    assert result.returncode == 0, result.stderr[-5000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["optimizer"]["optimizer_class"].startswith("tf_keras.")
    assert "legacy" in out["legacy"]["optimizer_class"]
    for flavour, run in out.items():
        assert run["replicas"] == 2, flavour
        assert run["steps"] == 2, flavour
        records, reference = run["records"], run["reference"]
        # Each replica saw half the batch; the reported norms are those of the all-reduced (full-batch) gradients.
        for name in HEALTHY:
            assert records[name]["state"] == "ok", (flavour, name)
            assert records[name]["norm"] == pytest.approx(reference[name], rel=1e-5), (flavour, name)
        assert run["global_norm"] == pytest.approx(run["reference_global_norm"], rel=1e-5), flavour
        for name in DISCONNECTED:
            assert reference[name] is None
            assert records[name]["state"] == "missing", (flavour, name)
            assert records[name]["missing_steps"] == 2, (flavour, name)
