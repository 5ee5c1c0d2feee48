"""``gradtel stack``: Prometheus and Alertmanager on loopback with gradtel's shipped configs, without Docker.

It runs the Debian/upstream binaries (``prometheus``, ``prometheus-alertmanager`` or ``alertmanager``) on
the files in deploy/ so that what a user tries locally is what docker-compose and Kubernetes run: the only
changes are addresses (each compose host:port becomes a loopback one) and, with ``--webhook-url``, a webhook
on the default receiver. Data lives in a temporary directory unless ``--data-dir`` is given.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from gradtel import assets

LOOPBACK = "127.0.0.1"
DEFAULT_TARGET = f"{LOOPBACK}:9464"
#: The shipped configs: the wheel's gradtel/_assets/deploy, or the checkout's deploy/ (editable install).
DEFAULT_DEPLOY_DIR = assets.root() / "deploy"
#: The compose addresses in deploy/prometheus/prometheus.yml, by the role each one plays.
COMPOSE_TARGETS: dict[str, str] = {
    "trainer:9464": "target",
    "localhost:9090": "prometheus",
    "alertmanager:9093": "alertmanager",
}
_READY_TIMEOUT_S = 30.0


class StackError(RuntimeError):
    """The stack could not start (missing binary, bad config, port in use)."""


@dataclass(frozen=True)
class StackConfig:
    """Where the configs come from, where data goes, and the loopback addresses to use."""

    data_dir: Path
    deploy_dir: Path = DEFAULT_DEPLOY_DIR
    target: str = DEFAULT_TARGET
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    webhook_url: str | None = None

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{LOOPBACK}:{self.alertmanager_port}"

    def addresses(self) -> dict[str, str]:
        """The loopback address of each role in :data:`COMPOSE_TARGETS`."""
        return {
            "target": self.target,
            "prometheus": f"{LOOPBACK}:{self.prometheus_port}",
            "alertmanager": f"{LOOPBACK}:{self.alertmanager_port}",
        }


def _local(address: str, addresses: Mapping[str, str]) -> str:
    role = COMPOSE_TARGETS.get(address)
    if role is None:
        raise StackError(f"prometheus.yml targets {address}, which gradtel stack cannot map to loopback")
    return addresses[role]


def prometheus_config(shipped: dict[str, Any], config_dir: Path, addresses: Mapping[str, str]) -> dict[str, Any]:
    """The shipped Prometheus config with loopback targets and rule files resolved against ``config_dir``."""
    result = copy.deepcopy(shipped)
    result["rule_files"] = [str((config_dir / name).resolve()) for name in shipped.get("rule_files", [])]
    static_blocks = [
        *(static for job in result.get("scrape_configs", []) for static in job.get("static_configs", [])),
        *(
            static
            for am in result.get("alerting", {}).get("alertmanagers", [])
            for static in am.get("static_configs", [])
        ),
    ]
    for static in static_blocks:
        static["targets"] = [_local(address, addresses) for address in static["targets"]]
    return result


def alertmanager_config(shipped: dict[str, Any], webhook_url: str | None) -> dict[str, Any]:
    """The shipped Alertmanager config, with a webhook added to the default receiver when asked."""
    result = copy.deepcopy(shipped)
    if webhook_url is not None:
        default = result["route"]["receiver"]
        for receiver in result["receivers"]:
            if receiver["name"] == default:
                receiver.setdefault("webhook_configs", []).append({"url": webhook_url, "send_resolved": True})
    return result


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(
        f"{' or '.join(names)} not found on PATH (Debian/Ubuntu: apt-get install prometheus prometheus-alertmanager)"
    )


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url``/-/ready until it answers, failing early (with the log) if the process exits."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{url} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise StackError(f"{url} not ready after {_READY_TIMEOUT_S:.0f}s; see {log}")


class Stack:
    """Prometheus and Alertmanager processes; a context manager that always stops both."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._processes: list[subprocess.Popen[bytes]] = []

    def _write_configs(self) -> tuple[Path, Path]:
        deploy, data = self.config.deploy_dir, self.config.data_dir
        prom_dir = deploy / "prometheus"
        prom = prometheus_config(
            yaml.safe_load((prom_dir / "prometheus.yml").read_text()), prom_dir, self.config.addresses()
        )
        am = alertmanager_config(
            yaml.safe_load((deploy / "alertmanager" / "alertmanager.yml").read_text()), self.config.webhook_url
        )
        prom_file, am_file = data / "prometheus.yml", data / "alertmanager.yml"
        prom_file.write_text(yaml.safe_dump(prom, sort_keys=False))
        am_file.write_text(yaml.safe_dump(am, sort_keys=False))
        return prom_file, am_file

    def _spawn(self, name: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.config.data_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._processes.append(process)
        return process, log

    def start(self) -> None:
        """Write the configs, start Alertmanager then Prometheus, and wait until both are ready."""
        data = self.config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        prom_file, am_file = self._write_configs()
        try:
            am, am_log = self._spawn(
                "alertmanager",
                [
                    _binary("prometheus-alertmanager", "alertmanager"),
                    f"--config.file={am_file}",
                    f"--storage.path={data / 'alertmanager-data'}",
                    f"--web.listen-address={LOOPBACK}:{self.config.alertmanager_port}",
                    "--cluster.listen-address=",  # no gossip port: a single local instance
                ],
            )
            prom, prom_log = self._spawn(
                "prometheus",
                [
                    _binary("prometheus"),
                    f"--config.file={prom_file}",
                    f"--storage.tsdb.path={data / 'prometheus-data'}",
                    f"--web.listen-address={LOOPBACK}:{self.config.prometheus_port}",
                ],
            )
            _wait_ready(self.config.alertmanager_url, am, am_log)
            _wait_ready(self.config.prometheus_url, prom, prom_log)
        except BaseException:
            self.stop()
            raise

    def exited(self) -> bool:
        """Whether either process has exited on its own."""
        return any(process.poll() is not None for process in self._processes)

    def stop(self) -> None:
        """SIGTERM both (they flush their data), then SIGKILL whatever is still running after 10 s."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradtel stack",
        description="Run Prometheus and Alertmanager on loopback with gradtel's rules, scraping a local run.",
    )
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"host:port of the training process's /metrics (default {DEFAULT_TARGET})",
    )
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep configs, logs and data here (default: a temporary directory, removed on exit)",
    )
    parser.add_argument(
        "--deploy-dir",
        type=Path,
        default=DEFAULT_DEPLOY_DIR,
        help="directory holding the prometheus/ and alertmanager/ configs (default: the repository's deploy/)",
    )
    parser.add_argument("--webhook-url", default=None, help="also send notifications to this webhook")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Start the stack, print its URLs, and run until Ctrl-C or SIGTERM (exit 1 if a process dies)."""
    args = _parser().parse_args(argv)
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="gradtel-stack-")) if temporary else args.data_dir
    config = StackConfig(
        data_dir=data_dir,
        deploy_dir=args.deploy_dir,
        target=args.target,
        prometheus_port=args.prometheus_port,
        alertmanager_port=args.alertmanager_port,
        webhook_url=args.webhook_url,
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(config)
    try:
        stack.start()
        print(f"Prometheus   {config.prometheus_url}  (scraping {config.target}, job gradtel)")
        print(f"Alertmanager {config.alertmanager_url}")
        print(f"Data and logs in {data_dir}. Ctrl-C stops both.", flush=True)
        while not stop.wait(1.0):
            if stack.exited():
                print(f"gradtel stack: a process exited; see the logs in {data_dir}", file=sys.stderr)
                return 1
        return 0
    except StackError as error:
        print(f"gradtel stack: {error}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
