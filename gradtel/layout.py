"""The packed layout of gradtel's accumulator variable, shared by the step (writer) and the exporter (reader).

One float64 vector per table: ``[globals..., rows x variables]``. Kept free of TensorFlow so the exporter, the
report and the CLI can decode snapshots without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradtel.vocabulary import State

#: Per-variable rows of the packed accumulator.
MISSING, ZERO, NONFINITE, STEPS_SEEN, NORM, MAX_ABS, STATE, ROWS_TOUCHED = range(8)
#: The table's step (1-based) at which the gradient was first missing / all-zero / non-finite (0: never), and the
#: latest step at which it was healthy again right after a step in that state (0: never recovered).
FIRST_MISSING, FIRST_ZERO, FIRST_NONFINITE, RECOVERED_MISSING, RECOVERED_ZERO, RECOVERED_NONFINITE = range(8, 14)
N_ROWS = 14
#: Counter rows accumulate; the others hold the latest step's value...
COUNTER_ROWS = (MISSING, ZERO, NONFINITE, STEPS_SEEN)
#: ...except these, which keep their first non-zero value...
FIRST_ROWS = (FIRST_MISSING, FIRST_ZERO, FIRST_NONFINITE)
#: ...and these, which keep their latest non-zero value.
LATEST_ROWS = (RECOVERED_MISSING, RECOVERED_ZERO, RECOVERED_NONFINITE)
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
#: The rows of first bad steps and of recoveries, by state.
FIRST_ROW_OF = {State.MISSING: FIRST_MISSING, State.ZERO: FIRST_ZERO, State.NONFINITE: FIRST_NONFINITE}
RECOVERED_ROW_OF = {State.MISSING: RECOVERED_MISSING, State.ZERO: RECOVERED_ZERO, State.NONFINITE: RECOVERED_NONFINITE}


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of a table: optimizer-level values and a [N_ROWS, n_variables] array."""

    steps: int
    global_norm: float
    skipped: int  # steps a loss-scale optimizer skipped because a gradient overflowed
    rows: np.ndarray
    history_width: float = 1.0  # steps per point of the optimizer-level history
    layer_history_width: float = 1.0  # steps per point of the per-layer history
