"""Small helpers shared by the core tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import gradtel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_name(handle: gradtel.Handle) -> dict[str, gradtel.VariableRecord]:
    return {r.name: r for r in handle.records()}


def numpy_norm(grad: Any) -> float:
    """The L2 norm computed independently of gradtel: dense NumPy in float64."""
    import numpy as np
    import tensorflow as tf

    return float(np.linalg.norm(np.asarray(tf.convert_to_tensor(grad), dtype=np.float64).ravel()))


def gradtel_script(tmp_path: Path, script: str, *args: str, mode: str | None) -> subprocess.CompletedProcess:
    """``gradtel ARGS -- python train.py [MODE]`` on ``script`` written to ``tmp_path``, through the installed CLI,
    with the export off (the tests read the report and the exit status)."""
    from tests.core.test_cli import BIN, ENV

    path = tmp_path / "train.py"
    path.write_text(script)
    env = {**ENV, "OTEL_METRICS_EXPORTER": "none"}
    return subprocess.run(
        [BIN / "gradtel", *args, "--", sys.executable, str(path), *([mode] if mode else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
