"""``gradtel stack`` (gradtel/localstack.py): config rewriting, and the real processes start and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from gradtel import localstack
from tests.observability.conftest import require_binary
from tests.observability.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _config(tmp_path: Path, **kwargs: object) -> localstack.StackConfig:
    return localstack.StackConfig(
        data_dir=tmp_path, prometheus_port=19090, alertmanager_port=19093, target="127.0.0.1:9999", **kwargs
    )


def _shipped_prometheus() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def test_prometheus_config_only_changes_addresses_and_rule_paths(tmp_path: Path) -> None:
    shipped = _shipped_prometheus()
    local = localstack.prometheus_config(shipped, DEPLOY / "prometheus", _config(tmp_path).addresses())
    assert local["global"] == shipped["global"]
    assert [job["job_name"] for job in local["scrape_configs"]] == ["gradtel", "prometheus", "alertmanager"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in local["scrape_configs"]}
    assert targets == {
        "gradtel": ["127.0.0.1:9999"],
        "prometheus": ["127.0.0.1:19090"],
        "alertmanager": ["127.0.0.1:19093"],
    }
    assert local["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:19093"]
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in local["rule_files"])
    assert shipped == _shipped_prometheus(), "the shipped document is not modified in place"


def test_unknown_shipped_target_is_an_error(tmp_path: Path) -> None:
    shipped = _shipped_prometheus()
    shipped["scrape_configs"][0]["static_configs"][0]["targets"] = ["elsewhere:1"]
    with pytest.raises(localstack.StackError, match="elsewhere:1"):
        localstack.prometheus_config(shipped, DEPLOY / "prometheus", _config(tmp_path).addresses())


def test_rendered_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    local = localstack.prometheus_config(_shipped_prometheus(), DEPLOY / "prometheus", _config(tmp_path).addresses())
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(local))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_webhook_is_added_to_the_default_receiver_only_when_asked() -> None:
    shipped = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    assert localstack.alertmanager_config(shipped, None) == shipped
    local = localstack.alertmanager_config(shipped, "http://127.0.0.1:5001/")
    default = next(r for r in local["receivers"] if r["name"] == local["route"]["receiver"])
    assert default["webhook_configs"] == [{"url": "http://127.0.0.1:5001/", "send_resolved": True}]
    assert "webhook_configs" not in next(r for r in shipped["receivers"] if r["name"] == default["name"])


def test_missing_binary_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code = localstack.main(
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--prometheus-port",
            str(free_port()),
            "--alertmanager-port",
            str(free_port()),
        ]
    )
    assert code == 1
    assert "not found on PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_stack_cli_serves_both_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    prom_port, am_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from gradtel.localstack import main; sys.exit(main(sys.argv[1:]))",
            "--prometheus-port",
            str(prom_port),
            "--alertmanager-port",
            str(am_port),
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        first_line = process.stdout.readline()
        assert f"http://127.0.0.1:{prom_port}" in first_line, first_line + process.stderr.read()
        for port in (prom_port, am_port):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
                assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5) as response:
            assert b"GradtelVariableDisconnected" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for log in ("prometheus.log", "alertmanager.log"):
        assert (tmp_path / log).is_file()
    wait_for(lambda: not _listening(prom_port) and not _listening(am_port), 10, "both ports to close")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
