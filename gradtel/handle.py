"""``Handle``: the public link between one optimizer and gradtel, composed of parts named for what they do.

- gradtel/tables.py: the tables (one per variable list) and the variables' display names;
- gradtel/recording.py: recording steps (loss-scale unscaling, replica comparison, the in-graph update);
- gradtel/missing.py: reporting missing gradients (diagnosis, the warning, Keras's error enriched);
- gradtel/records.py: reading records (snapshots decoded into ``VariableRecord``s, the optimizer's summary).

``Handle`` keeps only what ties them together: the optimizer's entry points, which never raise into the step, and
the readers the exporter and the report call from their own threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from gradtel import records as records_
from gradtel.logonce import LogOnce
from gradtel.missing import MissingGradientReporter, MissingGradientWarning
from gradtel.naming import PatternSet
from gradtel.recording import StepRecorder
from gradtel.records import OptimizerSummary, VariableRecord, nonfinite_origins
from gradtel.tables import Tables

log = logging.getLogger("gradtel")

#: Re-exported: ``gradtel.handle`` is where users and the README have found these.
__all__ = ["Handle", "MissingGradientWarning", "OptimizerSummary", "VariableRecord", "nonfinite_origins"]


class Handle:
    """What ``gradtel.instrument`` returns: the live link between one optimizer and gradtel's tables."""

    def __init__(
        self,
        name: str,
        flavour: str,
        expect_missing: PatternSet,
        loss_scale: Any = None,
        diagnoser: Any = None,
        max_abs: bool = False,
    ) -> None:
        self.name = name
        self.max_abs = max_abs
        self.flavour = flavour
        self.expect_missing = expect_missing
        self.active = True
        self.tables = Tables(name, expect_missing, max_abs)
        #: The tables by variable list (the ids of its variables, in order).
        self._tables = self.tables.by_key
        self._recorder = StepRecorder(self.tables, loss_scale)
        self._missing = MissingGradientReporter(name, diagnoser, self._log_failure_once)
        self._log_once = LogOnce()  # one failure line per handle, whatever failed
        #: (object, method, had an instance attribute, its old value): what instrumenting replaced.
        self.patches: list[tuple[Any, str, bool, Any]] = []

    def __repr__(self) -> str:
        return f"<gradtel.Handle optimizer={self.name!r} tables={len(self._tables)} active={self.active}>"

    # --- inside the step -------------------------------------------------------------------------------
    def observe(self, grads: Sequence[Any], variables: Sequence[Any] | None) -> None:
        """Record one step's gradients, as handed to the optimizer. Never raises: a failure is logged once.

        Under a strategy with several replicas these are one replica's local gradients: they are diagnosed and
        their None pattern compared across replicas here, but measured after the all-reduce
        (:meth:`observe_reduced`), because the optimizer applies the sum.
        """
        if variables is None or len(grads) == 0 or len(grads) != len(variables):
            return
        try:
            table = self.tables.table_for(variables)
            self._missing.diagnose(table, grads, variables)
            if all(g is None for g in grads):
                # Every supported optimizer raises 'No gradients provided' here: the step never happens, in eager
                # mode as in a trace, so it is not counted; enriched_errors keeps its diagnosis for the report.
                return
            self._recorder.record(table, grads, variables)
        except Exception:
            self._log_failure_once("recording gradient statistics")

    def observe_reduced(self, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """The all-reduced gradients of one replica (multi-replica strategies only; unscaled, as applied)."""
        try:
            self._recorder.record_reduced(grads, variables)
        except Exception:
            self._log_failure_once("recording all-reduced gradient statistics")

    @contextlib.contextmanager
    def enriched_errors(self, grads: Sequence[Any], variables: Sequence[Any] | None) -> Iterator[None]:
        """Keras's 'No gradients provided for any variable' error, followed by gradtel's explanation."""
        with self._missing.enriched_errors(self.tables, variables):
            yield

    def _log_failure_once(self, what: str) -> None:
        self._log_once(
            log,
            logging.WARNING,
            "gradtel: %s failed for optimizer %r; training goes on without these statistics.",
            what,
            self.name,
            exc_info=True,
        )

    def variables(self) -> list[Any]:
        """The live variables this optimizer has been given (weak references: gradtel keeps none alive)."""
        return self.tables.variables()

    # --- from the exporter's and the report's threads -------------------------------------------------
    def totals(self) -> tuple[int, float]:
        """(steps observed, global norm at the latest step) across this optimizer's tables."""
        summary = self.summary()
        return summary.steps, summary.global_norm

    def summary(self) -> OptimizerSummary:
        """Optimizer-level values across this optimizer's tables (one read each)."""
        return records_.summarize(self.tables.snapshots())

    def read(self) -> tuple[OptimizerSummary, list[VariableRecord]]:
        """The summary and every variable's record from ONE read of each table: a consistent pair."""
        snapshots = self.tables.snapshots()
        return records_.summarize(snapshots), records_.decode(self.name, snapshots)

    def records(self) -> list[VariableRecord]:
        """The latest statistics of every variable this optimizer has seen (one read per table)."""
        return records_.decode(self.name, self.tables.snapshots())

    def history(self) -> dict[str, Any] | None:
        """The run's downsampled history (gradtel/history.py) of this optimizer's main variable list, the one that
        took the most steps (an optimizer given several lists, rare, has one history per list); None before a
        step."""
        from gradtel import history

        snapshots = [(t, s) for t, s in self.tables.snapshots() if s.steps]
        if not snapshots:
            return None
        table, snap = max(snapshots, key=lambda pair: pair[1].steps)
        global_buffer, layer_buffer = table.stats.read_history()
        return {
            "global": history.decode_global(global_buffer, snap.history_width),
            "layers": history.decode_layers(layer_buffer, snap.layer_history_width, table.stats.layers),
        }
