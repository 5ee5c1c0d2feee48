"""The run id follows the job across restarts (derived from the job's own id); the process id tells restarts apart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradtel import identity, reporting
from gradtel.config import Config
from tests.core.test_cli import ENV


def _tf_config(cluster: dict, task_type: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_an_explicit_run_id_wins_and_a_malformed_one_is_a_clear_error() -> None:
    env = {"GRADTEL_RUN_ID": "job-42", "TF_CONFIG": _tf_config({"worker": ["a:1"]}, "worker", 0)}
    assert identity.derive_run_id(env, hostname="h") == "job-42"
    with pytest.raises(ValueError, match=r"^GRADTEL_RUN_ID must be 1-128 characters.*got 'bad id'$"):
        identity.derive_run_id({"GRADTEL_RUN_ID": "bad id"})
    # In the configuration a bad value never raises: one warning line, and the id derived from the job instead.
    config = Config.from_env({"GRADTEL_RUN_ID": "x" * 129, "SLURM_JOB_ID": "77"})
    assert config.run_id == "slurm-77"
    (problem,) = [p for p in config.problems if p.setting == "GRADTEL_RUN_ID"]
    assert str(problem) == (
        f"gradtel: GRADTEL_RUN_ID={'x' * 129!r}: expected {identity.RUN_ID_EXPECTED}; the run "
        "id is derived from the job's own id instead."
    )


def test_every_worker_of_a_tfjob_gets_the_tfjob_name() -> None:
    cluster = {
        "chief": ["mnist-chief-0.ns.svc:2222"],
        "worker": ["mnist-worker-0.ns.svc:2222", "mnist-worker-1.ns.svc:2222"],
    }
    ids = {
        identity.derive_run_id({"TF_CONFIG": _tf_config(cluster, t, i)}, hostname=f"mnist-{t}-{i}")
        for t, i in (("chief", 0), ("worker", 0), ("worker", 1))
    }
    assert ids == {"mnist"}


def test_any_other_cluster_gets_one_id_per_cluster_the_same_on_every_worker() -> None:
    cluster = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}
    first = identity.derive_run_id({"TF_CONFIG": _tf_config(cluster, "worker", 0)}, hostname="a")
    second = identity.derive_run_id({"TF_CONFIG": _tf_config(cluster, "worker", 1)}, hostname="b")
    other = identity.derive_run_id({"TF_CONFIG": _tf_config({"worker": ["10.0.0.3:2222"]}, "worker", 0)}, hostname="a")
    assert first == second and first.startswith("tf-") and other != first


@pytest.mark.parametrize(
    ("hostname", "index", "expected"),
    [
        ("train-resnet-x7k2p", None, "train-resnet"),  # a Job's pod: <job>-<5 random characters>
        ("train-resnet-3-x7k2p", "3", "train-resnet"),  # an Indexed Job's pod: <job>-<index>-<5 characters>
        ("train-3-x7k2p", None, "train-3"),  # a Job whose name ends in a number
    ],
)
def test_a_kubernetes_job_pod_gets_the_job_name(hostname: str, index: str | None, expected: str) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", **({"JOB_COMPLETION_INDEX": index} if index else {})}
    assert identity.derive_run_id(env, hostname=hostname) == expected


def test_outside_a_platform_the_same_command_on_the_same_host_is_the_same_run() -> None:
    def run_id(argv: list[str], host: str = "node7.example.org", env: dict | None = None) -> str:
        return identity.derive_run_id(env or {}, hostname=host, argv=argv, cwd="/jobs/a")

    assert run_id(["train.py", "--lr", "0.1"]) == run_id(["train.py", "--lr", "0.1"])
    assert run_id(["train.py", "--lr", "0.1"]).startswith("node7-")
    assert run_id(["train.py", "--lr", "0.2"]) != run_id(["train.py", "--lr", "0.1"])
    assert run_id(["train.py"], host="node8") != run_id(["train.py"])
    # A hostname that looks like a Job pod means nothing outside Kubernetes.
    assert run_id(["t.py"], host="train-resnet-x7k2p").startswith("train-resnet-x7k2p-")
    assert run_id(["t.py"], env={"SLURM_JOB_ID": "991"}) == "slurm-991"


def test_the_process_is_told_apart_by_its_instance_id() -> None:
    attributes = Config(run_id="r").resource().attributes
    assert attributes["service.instance.id"] == identity.INSTANCE_ID and len(identity.INSTANCE_ID) == 32
    assert attributes["gradtel.run_id"] == "r"


def test_the_report_without_an_exporter_names_the_run_the_exporter_would() -> None:
    assert reporting.build()["run_id"] == Config.from_env().run_id == identity.derive_run_id()


def test_gradtel_run_with_run_id_labels_the_process_and_its_report(tmp_path) -> None:
    report = tmp_path / "report.json"
    script = "import os; print(os.environ['GRADTEL_RUN_ID'])"
    env = {**ENV, "OTEL_METRICS_EXPORTER": "none"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradtel.cli",
            "run",
            "--run-id",
            "resnet-7",
            "--report",
            str(report),
            "--",
            sys.executable,
            "-c",
            script,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "resnet-7"
    assert json.loads(report.read_text())["run_id"] == "resnet-7"
    bad = subprocess.run(
        [sys.executable, "-m", "gradtel.cli", "run", "--run-id", "two words", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--run-id must be 1-128 characters" in bad.stderr
