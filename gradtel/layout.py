"""The packed layout of gradtel's accumulator variable, shared by the step (writer) and the exporter (reader).

One float64 vector per table: ``[globals..., rows x variables]``. Kept free of TensorFlow so the exporter, the
report and the CLI can decode snapshots without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradtel import statistics
from gradtel.vocabulary import State

#: Per-variable rows of the packed accumulator, one per statistic, in the order of gradtel/statistics.py.
ROW = statistics.ROW
STEPS_SEEN, MISSING, ZERO, NONFINITE = ROW["steps"], ROW["missing_steps"], ROW["zero_steps"], ROW["nonfinite_steps"]
NORM, MAX_ABS, ROWS_TOUCHED, STATE = ROW["norm"], ROW["max_abs"], ROW["rows_touched"], ROW["state"]
#: The table's step (1-based) at which the gradient was first missing / all-zero / non-finite (0: never), and the
#: latest step at which it was healthy again right after a step in that state (0: never recovered): six adjacent
#: rows, updated together by one block of vector ops (stats.py).
FIRST_MISSING, FIRST_ZERO, FIRST_NONFINITE = (
    ROW["first_missing_step"],
    ROW["first_zero_step"],
    ROW["first_nonfinite_step"],
)
RECOVERED_MISSING, RECOVERED_ZERO = ROW["recovered_missing_step"], ROW["recovered_zero_step"]
RECOVERED_NONFINITE = ROW["recovered_nonfinite_step"]
N_ROWS = len(statistics.STATISTICS)
#: Counter rows accumulate; the others are replaced by each step's value.
COUNTER_ROWS = tuple(ROW[s.field] for s in statistics.STATISTICS if s.update is statistics.Update.COUNT)
#: Optimizer-level slots, stored before the per-variable rows: steps, latest global norm, loss-scale skipped steps,
#: and the steps per point of the two histories (see gradtel/history.py).
G_STEPS, G_GLOBAL_NORM, G_SKIPPED, G_HISTORY_WIDTH, G_LAYER_HISTORY_WIDTH = range(5)
N_GLOBALS = 5
#: Which optimizer-level slots accumulate (steps, skipped) and which hold the latest value.
GLOBAL_COUNTERS = (True, False, True, False, False)

#: Values of the STATE row.
STATE_OK, STATE_MISSING, STATE_ZERO, STATE_NONFINITE = 0.0, 1.0, 2.0, 3.0
STATE_NAMES = {
    STATE_OK: State.OK,
    STATE_MISSING: State.MISSING,
    STATE_ZERO: State.ZERO,
    STATE_NONFINITE: State.NONFINITE,
}


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of a table: optimizer-level values and a [N_ROWS, n_variables] array."""

    steps: int
    global_norm: float
    skipped: int  # steps a loss-scale optimizer skipped because a gradient overflowed
    rows: np.ndarray
    history_width: float = 1.0  # steps per point of the optimizer-level history
    layer_history_width: float = 1.0  # steps per point of the per-layer history
