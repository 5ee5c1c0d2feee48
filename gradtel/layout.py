"""The packed layout of gradtel's accumulator variable, shared by the step (writer) and the exporter (reader).

One float64 vector per table (the one row of a ``[1, size]`` variable, which the step reads by ``ResourceGather``:
gradtel/stats.py says why), in three blocks, so that the step adds its counts to one slice, replaces the next and
takes the max of the last, with no per-element mask: a mask is a constant of one value per element, and TensorFlow's
graph optimisation at a step's first call pays for the graph's bytes too (docs/benchmarks.md, "The first call's
graph").

- accumulated: ``[steps, skipped]``, then the MISSING, ZERO and NONFINITE rows. STEPS_SEEN is not stored: every
  variable of a table is seen at each of the table's steps.
- latest: ``[global norm, history width, layer history width]``, then the NORM, MAX_ABS, ROWS_TOUCHED and STATE rows.
- max-folded: the FIRST_* rows (as ``FIRST_BASE - step``) and the RECOVERED_* rows (as the step).

``Storage`` says where each block starts; ``Storage.decode`` turns one read into a :class:`Snapshot` of plain rows.
Kept free of TensorFlow so the exporter, the report and the CLI can decode snapshots without importing it.
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
#: The first bad steps are stored as FIRST_BASE - step, so that a max keeps the earliest one (0: never); float64
#: holds every integer up to it exactly.
FIRST_BASE = float(2**53)
#: Values of the STATE row.
STATE_OK, STATE_MISSING, STATE_ZERO, STATE_NONFINITE = 0.0, 1.0, 2.0, 3.0
STATE_NAMES = {
    STATE_OK: State.OK,
    STATE_MISSING: State.MISSING,
    STATE_ZERO: State.ZERO,
    STATE_NONFINITE: State.NONFINITE,
}


#: Rows of each block, in storage order (the statistics' own order, STEPS_SEEN left out): the counters, the
#: latest values, the first-bad and recovery steps.
ACCUMULATED_ROWS = (MISSING, ZERO, NONFINITE)
LATEST_ROWS = (NORM, MAX_ABS, ROWS_TOUCHED, STATE)
MAX_ROWS = tuple(range(FIRST_MISSING, N_ROWS))
#: The slots before each block's rows.
ACCUMULATED_GLOBALS = 2  # steps, skipped (steps a loss-scale optimizer skipped because a gradient overflowed)
LATEST_GLOBALS = 3  # global norm at the latest step, steps per point of the two histories (gradtel/history.py)


@dataclass(frozen=True)
class Storage:
    """Where the blocks of a table of ``n`` variables start in its flat vector."""

    n: int

    @property
    def latest(self) -> int:
        """The latest block (its globals first)."""
        return ACCUMULATED_GLOBALS + len(ACCUMULATED_ROWS) * self.n

    @property
    def widths(self) -> slice:
        """The two histories' steps per point, after the global norm at the head of the latest block."""
        return slice(self.latest + 1, self.latest + LATEST_GLOBALS)

    @property
    def state(self) -> int:
        """The STATE row (the last of the latest block): the step reads the previous step's."""
        return self.folded - self.n

    @property
    def folded(self) -> int:
        """The max-folded block."""
        return self.latest + LATEST_GLOBALS + len(LATEST_ROWS) * self.n

    @property
    def size(self) -> int:
        """Values in all (13 per variable and 5)."""
        return self.folded + len(MAX_ROWS) * self.n

    @property
    def pieces(self) -> list[int]:
        """The lengths of the pieces the step cuts one read into (one ``SplitV``), in storage order: steps,
        skipped, the counters; the global norm, the two histories' widths, the latest rows one by one; the
        max-folded block."""
        assert (ACCUMULATED_GLOBALS, LATEST_GLOBALS) == (2, 3)  # the step names each of these pieces
        n = self.n
        return [1, 1, len(ACCUMULATED_ROWS) * n, 1, 1, 1, *[n] * len(LATEST_ROWS), len(MAX_ROWS) * n]

    def initial(self) -> np.ndarray:
        """Before any step: zeros, one step per point in both histories, and max |g| not measured (NaN: a table
        without ``max_abs`` keeps the row as it is)."""
        flat = np.zeros(self.size)
        flat[self.widths] = 1.0
        max_abs = self.latest + LATEST_GLOBALS + LATEST_ROWS.index(MAX_ABS) * self.n
        flat[max_abs : max_abs + self.n] = np.nan
        return flat

    def decode(self, flat: np.ndarray) -> Snapshot:
        """One read of the variable as the reader's rows, in the statistics' order."""
        n, latest, folded = self.n, self.latest, self.folded
        rows = np.empty([N_ROWS, n])
        rows[STEPS_SEEN] = flat[0]
        rows[list(ACCUMULATED_ROWS)] = flat[ACCUMULATED_GLOBALS:latest].reshape(-1, n)
        rows[list(LATEST_ROWS)] = flat[latest + LATEST_GLOBALS : folded].reshape(-1, n)
        first, recovered = flat[folded:].reshape(2, 3, n)
        rows[FIRST_MISSING : FIRST_MISSING + 3] = np.where(first > 0.0, FIRST_BASE - first, 0.0)
        rows[RECOVERED_MISSING : RECOVERED_MISSING + 3] = recovered
        width, layer_width = flat[self.widths]
        return Snapshot(
            steps=int(flat[0]),
            global_norm=float(flat[latest]),
            skipped=int(flat[1]),
            rows=rows,
            history_width=float(width),
            layer_history_width=float(layer_width),
        )


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of a table: optimizer-level values and a [N_ROWS, n_variables] array."""

    steps: int
    global_norm: float
    skipped: int  # steps a loss-scale optimizer skipped because a gradient overflowed
    rows: np.ndarray
    history_width: float = 1.0  # steps per point of the optimizer-level history
    layer_history_width: float = 1.0  # steps per point of the per-layer history
