"""The packed layout of gradtel's accumulator variable, shared by the step (writer) and the exporter (reader).

One float64 vector per table: ``[globals..., rows x variables]``. Kept free of TensorFlow so the exporter, the
report and the CLI can decode snapshots without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Per-variable rows of the packed accumulator.
MISSING, ZERO, NONFINITE, STEPS_SEEN, NORM, MAX_ABS, STATE, ROWS_TOUCHED = range(8)
N_ROWS = 8
#: Counter rows accumulate; the others hold the latest step's value.
COUNTER_ROWS = (MISSING, ZERO, NONFINITE, STEPS_SEEN)
#: Optimizer-level slots, stored before the per-variable rows.
G_STEPS, G_GLOBAL_NORM, G_SKIPPED = range(3)
N_GLOBALS = 3
#: Which optimizer-level slots accumulate (steps, skipped) and which hold the latest value (global norm).
GLOBAL_COUNTERS = (True, False, True)

#: Values of the STATE row.
STATE_OK, STATE_MISSING, STATE_ZERO, STATE_NONFINITE = 0.0, 1.0, 2.0, 3.0
STATE_NAMES = {STATE_OK: "ok", STATE_MISSING: "missing", STATE_ZERO: "zero", STATE_NONFINITE: "nonfinite"}


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of a table: optimizer-level values and a [N_ROWS, n_variables] array."""

    steps: int
    global_norm: float
    skipped: int  # steps a loss-scale optimizer skipped because a gradient overflowed
    rows: np.ndarray
