"""Small helpers shared by the core tests."""

from __future__ import annotations

import socket
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
