"""The run's history: bounded, downsampled series per statistics table, accumulated inside the compiled step.

Why inside the step: the step already holds every value gradtel could plot (the global norm, each variable's norm
and state), while the host sees them only when something reads the table. The exporter's collections are spaced by
their cost and happen only when a scraper or a push asks (never with ``OTEL_METRICS_EXPORTER=none``, in a notebook
or a CI job), and the report is read once, at exit: sampling at either place would lose the first steps and every
extreme between two reads. Folding each step into a fixed buffer in the step costs a fixed number of vector ops
(three segment reductions, and a two-row read and one scatter per buffer) whatever the model's size, no control
flow in the user's graph, and no host round trip; the report reads the buffers once, where it reads the table.

How: a buffer of ``P`` points by ``K`` columns, every column merged by max (a minimum is kept negated, so it is a
max too), empty points at -inf. Point ``i`` covers the steps ``[i*w + 1, (i+1)*w]``; ``w``, the steps per point,
starts at 1. When a step would land past the last point, ``w`` doubles and adjacent pairs of points are merged (the
max of each pair, so the minima and maxima stay exact), one pair at the first step of each new point, so the merge
is spread over the steps instead of being a ``cond`` in the step (``gradtel.stats._History`` says where each point
lives). A run of any length thus keeps ``P`` points once it has filled the buffer, its first and its last step, and
the extremes of every interval: a 1,000,000-step run keeps 512 points, 466 of 2,048 steps and 46 of 1,024. Each
point also records its own first and last step, so a reader needs nothing else to place it: it sorts them (and a
read racing a merge misplaces nothing).

Two histories per table: the optimizer-level one (global norm min/max, the counts of unexpectedly missing, all-zero
and non-finite variables: at most 512 points) and the per-layer one (each layer's norm min/max over its finite
gradients and its worst state). Up to ~170 layers they share one buffer (one scatter per step); beyond, the
per-layer one has its own with fewer points, so that it stays under :data:`LAYER_VALUES` values (2 MiB) until the
16-point floor wins (beyond ~5,400 layers). This module is free of TensorFlow: the step's side is
``gradtel.stats``; here are the layout and the decoding for the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradtel.vocabulary import State

#: Points of the optimizer-level history (a power of two: pairs merge evenly).
GLOBAL_POINTS = 512
#: The per-layer history holds at most this many values (points x columns), and 16 to 512 points.
LAYER_VALUES = 1 << 18
MIN_LAYER_POINTS, MAX_LAYER_POINTS = 16, 512

#: Columns of both buffers: the point's first step (negated) and last step.
FIRST_STEP, LAST_STEP = 0, 1
#: Columns of the optimizer-level buffer after those two.
NORM_MIN, NORM_MAX, N_MISSING, N_ZERO, N_NONFINITE = range(2, 7)
GLOBAL_COLUMNS = 7
#: A layer's worst state, as a severity: ok < expected_missing < missing < zero < nonfinite (the STATE row's codes,
#: with variables declared expected to be missing at 0.5).
SEVERITY_NAMES: dict[float, str] = {
    severity: state.value
    for severity, state in (
        (0.0, State.OK),
        (0.5, State.EXPECTED_MISSING),
        (1.0, State.MISSING),
        (2.0, State.ZERO),
        (3.0, State.NONFINITE),
    )
}
_OK = State.OK.value


def layer_points(n_layers: int) -> int:
    """Points of the per-layer history: 512 up to ~170 layers, fewer (a power of two, at least 16) beyond."""
    columns = layer_columns(n_layers)
    points = MAX_LAYER_POINTS
    while points > MIN_LAYER_POINTS and points * columns > LAYER_VALUES:
        points //= 2
    return points


def layer_columns(n_layers: int) -> int:
    """First/last step, then per layer: norm min (negated), norm max, worst state."""
    return 2 + 3 * n_layers


def _points(buffer: np.ndarray) -> np.ndarray:
    """The points that hold a step (the others are still empty), in step order (a buffer keeps them in rotated
    slots, see ``gradtel.stats._History``)."""
    points = buffer[buffer[:, LAST_STEP] > 0]
    return points[np.argsort(points[:, LAST_STEP], kind="stable")]


def _finite(values: np.ndarray) -> list[float | None]:
    """JSON has no -inf: a point without a finite value (no present finite gradient) is null."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def _steps(buffer: np.ndarray) -> dict[str, Any]:
    return {
        "first_step": [int(-v) for v in buffer[:, FIRST_STEP].tolist()],
        "last_step": [int(v) for v in buffer[:, LAST_STEP].tolist()],
    }


def decode_global(buffer: np.ndarray, width: float) -> dict[str, Any]:
    """The optimizer-level history as the report writes it (docs/report.md, ``history.global``)."""
    points = _points(buffer)
    return {
        "steps_per_point": int(max(width, 1)),
        **_steps(points),
        "global_norm_min": _finite(-points[:, NORM_MIN]),
        "global_norm_max": _finite(points[:, NORM_MAX]),
        "missing": [int(v) for v in points[:, N_MISSING].tolist()],
        "zero": [int(v) for v in points[:, N_ZERO].tolist()],
        "nonfinite": [int(v) for v in points[:, N_NONFINITE].tolist()],
    }


def decode_layers(buffer: np.ndarray, width: float, layers: Sequence[str]) -> dict[str, Any]:
    """The per-layer history as the report writes it (docs/report.md, ``history.layers``)."""
    points = _points(buffer)
    n = len(layers)
    norm_min, norm_max, worst = (points[:, 2 + k * n : 2 + (k + 1) * n] for k in range(3))
    series = [
        {
            "layer": layer,
            "norm_min": _finite(-norm_min[:, j]),
            "norm_max": _finite(norm_max[:, j]),
            "state": [SEVERITY_NAMES.get(v, _OK) for v in worst[:, j].tolist()],
        }
        for j, layer in enumerate(layers)
    ]
    return {"steps_per_point": int(max(width, 1)), **_steps(points), "series": series}
