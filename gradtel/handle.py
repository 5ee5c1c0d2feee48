"""The per-optimizer state gradtel keeps: which variables it saw, their tables, and how to read them back.

``Handle.observe`` runs inside the optimizer's funnel. In graph mode (``tf.function``, ``model.fit``, XLA) it
runs once per trace and builds the statistics ops into the step; in eager mode it runs each step and calls a
``tf.function`` of the same ops, so there is no per-variable Python work per step either way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from gradtel import layout
from gradtel.logonce import LogOnce
from gradtel.naming import PatternSet, layer_of, unique_names, variable_path
from gradtel.vocabulary import MissingCause, State

if TYPE_CHECKING:
    from gradtel.diagnosis.cause import Cause

log = logging.getLogger("gradtel")


#: The states, bound once: looking a member up on its enum costs about 75 ns, and ``records`` builds one record per
#: variable per collection.
_OK, _MISSING, _ZERO = State.OK, State.MISSING, State.ZERO
_EXPECTED_MISSING, _REPLICA_DISAGREEMENT = State.EXPECTED_MISSING, State.REPLICA_DISAGREEMENT
_NO_GRADIENT = (_MISSING, _EXPECTED_MISSING)


class MissingGradientWarning(UserWarning):
    """Some (not all) gradients are None: which variables, and why."""


class VariableRecord(NamedTuple):
    """The latest statistics of one variable, as the exporter and the report see them (immutable).

    A named tuple, not a frozen dataclass: a collection of a 10,000-variable model builds 10,000 of these, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) made building them a third of it.
    """

    optimizer: str
    name: str
    layer: str
    expected_missing: bool
    cause: Cause | None  # why the latest gradient is missing or zero, once diagnosed
    missing_cause: Cause | None  # the Cause of the variable's missing steps (labels the missing counter)
    steps: int
    missing_steps: int
    zero_steps: int
    nonfinite_steps: int
    norm: float
    max_abs: float
    rows_touched: int
    state: str  # a State; a layer roll-up of several states (series.py) is "mixed"
    #: The step (1-based, counted by gradtel for this variable list) at which the gradient was first missing /
    #: all-zero / non-finite, and the latest step at which it was healthy right after being so; 0: never.
    first_missing_step: int = 0
    first_zero_step: int = 0
    first_nonfinite_step: int = 0
    recovered_missing_step: int = 0
    recovered_zero_step: int = 0
    recovered_nonfinite_step: int = 0


@dataclass(frozen=True)
class OptimizerSummary:
    """Optimizer-level statistics: steps observed, latest global norm, loss-scale skipped steps."""

    steps: int
    global_norm: float
    skipped_steps: int
    raised: str | None = None  # Keras's error, when a step of this optimizer raised because every gradient was None


@dataclass
class _Table:
    """A StatsTable plus the names of its variables and what the diagnosis said about them."""

    stats: Any  # gradtel.stats.StatsTable (imported lazily: it needs TensorFlow)
    variable_ids: tuple[int, ...]
    names: list[str]
    layers: list[str]
    expected: list[bool]
    causes: dict[int, Cause] = field(default_factory=dict)  # index -> Cause of a None gradient
    #: the diagnoses of this variable list (newest last, a few): their zero hints are read only for zero gradients
    diagnoses: dict[int, Any] = field(default_factory=dict)
    compiled: Any = None  # tf.function of stats.update, for eager steps
    lock: threading.Lock = field(default_factory=threading.Lock)  # serialises eager updates
    warned: tuple[int, ...] = ()  # the missing set last warned about
    disagreement: set[int] = field(default_factory=set)  # None on some replicas, present on others
    pending: tuple[int, ...] = ()  # a missing set whose causes were still being recorded
    raised: str | None = None  # Keras's error when a step with these variables raised (every gradient None)


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
        self._diagnoser = diagnoser
        self.flavour = flavour
        self.expect_missing = expect_missing
        self.active = True
        self._loss_scale = loss_scale
        self._lock = threading.Lock()
        self._tables: dict[tuple[int, ...], _Table] = {}
        self._names: dict[int, str] = {}  # id(variable) -> display name, stable for the handle's life
        self._variables: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._taken: dict[str, int] = {}
        self._log_once = LogOnce()  # one failure line per handle, whatever failed
        #: (object, method, had an instance attribute, its old value): what instrumenting replaced.
        self.patches: list[tuple[Any, str, bool, Any]] = []
        #: id of the tf.Variable inside a Keras 3 variable -> the Keras variable (the reducer sees the former).
        self._outer: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        #: per replica thread: the full variable list of the step being traced, for observe_reduced.
        self._local = threading.local()
        #: table key -> replica id -> indices of None gradients on that replica (static per trace).
        self._replica_missing: dict[tuple[int, ...], dict[int, frozenset[int]]] = {}

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
            table = self._table_for(variables)
            self._diagnose(table, grads, variables)
            if all(g is None for g in grads):
                # Every supported optimizer raises 'No gradients provided' here: the step never happens, in eager
                # mode as in a trace, so it is not counted; enriched_errors keeps its diagnosis for the report.
                return
            replica = _replica()
            if replica is None:
                self._measure(table, self._unscaled(grads), loss_scaled=self._loss_scale is not None)
            else:
                self._compare_replicas(table, replica, grads)
                self._local.variables = list(variables)  # the reducer sees only the present ones
                for v in variables:
                    inner = getattr(v, "value", None)
                    if inner is not None and inner is not v:
                        self._outer[id(inner)] = v
        except Exception:
            self._log_failure_once("recording gradient statistics")

    def observe_reduced(self, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """The all-reduced gradients of one replica (multi-replica strategies only; unscaled, as applied)."""
        if _replica() is None or not grads:
            return
        try:
            reduced = {id(self._outer.get(id(v), v)): g for g, v in zip(grads, variables, strict=True)}
            full = getattr(self._local, "variables", None) or [self._outer.get(id(v), v) for v in variables]
            self._measure(self._table_for(full), [reduced.get(id(v)) for v in full])
        except Exception:
            self._log_failure_once("recording all-reduced gradient statistics")

    def _measure(self, table: _Table, grads: Sequence[Any], loss_scaled: bool = False) -> None:
        import tensorflow as tf

        if tf.inside_function():
            table.stats.update(grads, loss_scaled)
            return
        # Eager: the update reads then writes the table; steps from several threads must not interleave.
        with table.lock:
            if table.compiled is None:
                table.compiled = tf.function(table.stats.update, autograph=False)
            table.compiled(list(grads), loss_scaled)

    def _compare_replicas(self, table: _Table, replica: int, grads: Sequence[Any]) -> None:
        """A variable with a gradient on some replicas and None on others is flagged (static, at trace time)."""
        missing = frozenset(i for i, g in enumerate(grads) if g is None)
        with self._lock:
            seen = self._replica_missing.setdefault(table.variable_ids, {})
            seen[replica] = missing
            patterns = set(seen.values())
            if len(patterns) > 1:
                table.disagreement = set().union(*patterns) - frozenset.intersection(*patterns)

    def _diagnose(self, table: _Table, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """Why gradients are None (graph: once per trace; eager: cheap unless the missing set is new)."""
        if self._diagnoser is None:
            return
        try:
            diagnosis = self._diagnoser.diagnose(list(grads), list(variables))
            table.causes.update(diagnosis.causes)
            table.diagnoses.pop(id(diagnosis), None)
            table.diagnoses[id(diagnosis)] = diagnosis
            while len(table.diagnoses) > _DIAGNOSES_KEPT:
                del table.diagnoses[next(iter(table.diagnoses))]
            self._warn_partial(table, [i for i, g in enumerate(grads) if g is None], len(grads))
        except Exception:
            self._log_failure_once("diagnosing missing gradients")

    def _warn_partial(self, table: _Table, missing: list[int], total: int) -> None:
        """One warning per new set of unexpectedly missing gradients, naming each cause (Keras names none).

        In eager mode a cause still pending (the next step is recorded) waits one step rather than warn twice;
        a trace is diagnosed once, so graph mode warns at once.
        """
        unexpected = tuple(i for i in missing if not table.expected[i])
        if not unexpected or len(missing) == total or unexpected == table.warned:
            return
        import tensorflow as tf

        pending = not tf.inside_function() and any(
            getattr(table.causes.get(i), "category", MissingCause.UNKNOWN) == MissingCause.UNKNOWN for i in unexpected
        )
        if pending and unexpected != table.pending:
            table.pending = unexpected
            return
        table.warned = unexpected
        warnings.warn(
            MissingGradientWarning(
                f"gradtel: gradients do not exist for {len(unexpected)} of {total} variables of optimizer "
                f"{self.name!r}; they are not training:\n" + "\n".join(self._cause_lines(table, unexpected))
            ),
            stacklevel=2,
        )

    @staticmethod
    def _cause_lines(table: _Table, indices: Sequence[int]) -> list[str]:
        lines = []
        for i in indices:
            cause = table.causes.get(i)
            if cause is None:
                lines.append(f"  - {table.names[i]}: cause not diagnosed")
            else:
                where = f" at {cause.location}" if cause.location else ""
                lines.append(f"  - {table.names[i]}: {cause.category}{where}: {cause.explanation}")
        return lines

    @contextlib.contextmanager
    def enriched_errors(self, grads: Sequence[Any], variables: Sequence[Any] | None) -> Iterator[None]:
        """Keras's 'No gradients provided for any variable' error, followed by gradtel's explanation."""
        try:
            yield
        except ValueError as error:
            if not str(error).startswith("No gradients provided") or variables is None:
                raise
            table = self._tables.get(tuple(id(v) for v in variables))
            if table is not None:  # the report and the gate keep the diagnosis of a step that never ran
                table.raised = str(error).splitlines()[0]
            raise ValueError(f"{error}\n{self._explain_missing(variables)}") from error

    def _explain_missing(self, variables: Sequence[Any]) -> str:
        table = self._tables.get(tuple(id(v) for v in variables))
        if table is None:
            return "gradtel: every gradient is missing (not diagnosed)."
        return "\n".join(["gradtel: every gradient is missing:", *self._cause_lines(table, range(len(variables)))])

    def _unscaled(self, grads: Sequence[Any]) -> list[Any]:
        scale_variable = self._loss_scale() if self._loss_scale is not None else None
        if scale_variable is None:
            return list(grads)
        import tensorflow as tf

        scale = tf.cast(tf.convert_to_tensor(scale_variable), tf.float32)

        def unscale(g: Any) -> Any:
            if g is None:
                return None
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values / tf.cast(scale, g.values.dtype), g.indices, g.dense_shape)
            return g / tf.cast(scale, g.dtype)

        return [unscale(g) for g in grads]

    def _table_for(self, variables: Sequence[Any]) -> _Table:
        key = tuple(id(v) for v in variables)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                new = [v for v in variables if id(v) not in self._names]
                for v, display in zip(new, unique_names([variable_path(v) for v in new], self._taken), strict=True):
                    self._names[id(v)] = display
                    with contextlib.suppress(TypeError):  # not weak-referenceable: not listed by variables()
                        self._variables[id(v)] = v
                names = [self._names[id(v)] for v in variables]
                from gradtel import stats

                table = _Table(
                    stats=None,
                    variable_ids=key,
                    names=names,
                    layers=[layer_of(variable_path(v)) for v in variables],
                    expected=[self.expect_missing.matches(n) for n in names],
                )
                table.stats = stats.StatsTable(
                    len(variables), f"{self.name}_{len(self._tables)}", self.max_abs, table.layers, table.expected
                )
                self._tables[key] = table
            return table

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
        return list(self._variables.values())

    # --- from the exporter's and the report's threads -------------------------------------------------
    def totals(self) -> tuple[int, float]:
        """(steps observed, global norm at the latest step) across this optimizer's tables."""
        summary = self.summary()
        return summary.steps, summary.global_norm

    def summary(self) -> OptimizerSummary:
        """Optimizer-level values across this optimizer's tables (one read each)."""
        return self._summarize(self._snapshot_tables())

    def read(self) -> tuple[OptimizerSummary, list[VariableRecord]]:
        """The summary and every variable's record from ONE read of each table: a consistent pair."""
        snapshots = self._snapshot_tables()
        return self._summarize(snapshots), self._records(snapshots)

    @staticmethod
    def _summarize(snapshots: list[tuple[_Table, layout.Snapshot]]) -> OptimizerSummary:
        steps, skipped, global_norm, raised = 0, 0, float("nan"), None
        for table, snap in snapshots:
            steps += snap.steps
            skipped += snap.skipped
            if snap.steps:
                global_norm = snap.global_norm
            raised = table.raised or raised
        return OptimizerSummary(steps, global_norm, skipped, raised)

    def records(self) -> list[VariableRecord]:
        """The latest statistics of every variable this optimizer has seen (one read per table)."""
        return self._records(self._snapshot_tables())

    def _records(self, snapshots: list[tuple[_Table, layout.Snapshot]]) -> list[VariableRecord]:
        out: dict[str, VariableRecord] = {}
        for table, snap in snapshots:
            rows = snap.rows.tolist()  # once: indexing numpy per field costs more than building the record
            missing, zero, nonfinite = rows[layout.MISSING], rows[layout.ZERO], rows[layout.NONFINITE]
            seen, norm, max_abs = rows[layout.STEPS_SEEN], rows[layout.NORM], rows[layout.MAX_ABS]
            states, touched = rows[layout.STATE], rows[layout.ROWS_TOUCHED]
            first_missing, first_zero, first_nonfinite = rows[layout.FIRST_MISSING : layout.FIRST_NONFINITE + 1]
            back_missing, back_zero, back_nonfinite = rows[layout.RECOVERED_MISSING : layout.RECOVERED_NONFINITE + 1]
            for i, name in enumerate(table.names):
                if not seen[i] and table.raised is None:
                    continue
                # A traced step that raised never ran its statistics: every variable of it is missing, as diagnosed.
                state = layout.STATE_NAMES.get(states[i], _OK) if seen[i] else _MISSING
                if i in table.disagreement:
                    state = _REPLICA_DISAGREEMENT
                elif state == _MISSING and table.expected[i]:
                    state = _EXPECTED_MISSING
                missing_cause = table.causes.get(i) if missing[i] or not seen[i] else None
                cause = missing_cause if state in _NO_GRADIENT else _zero_hint(table, i) if state == _ZERO else None
                record = VariableRecord(
                    self.name,
                    name,
                    table.layers[i],
                    table.expected[i],
                    cause,
                    missing_cause,
                    int(seen[i]),
                    int(missing[i]),
                    int(zero[i]),
                    int(nonfinite[i]),
                    norm[i],
                    max_abs[i],
                    int(touched[i]),
                    state,
                    int(first_missing[i]),
                    int(first_zero[i]),
                    int(first_nonfinite[i]),
                    # a recovery from a state never counted as bad (a loss-scale optimizer's skipped step) is none
                    int(back_missing[i]) if first_missing[i] else 0,
                    int(back_zero[i]) if first_zero[i] else 0,
                    int(back_nonfinite[i]) if first_nonfinite[i] else 0,
                )
                previous = out.get(name)
                out[name] = record if previous is None else _merge(previous, record)
        return list(out.values())

    def history(self) -> dict[str, Any] | None:
        """The run's downsampled history (gradtel/history.py) of this optimizer's main variable list, the one that
        took the most steps (an optimizer given several lists, rare, has one history per list); None before a
        step."""
        from gradtel import history

        snapshots = [(t, s) for t, s in self._snapshot_tables() if s.steps]
        if not snapshots:
            return None
        table, snap = max(snapshots, key=lambda pair: pair[1].steps)
        global_buffer, layer_buffer = table.stats.read_history()
        return {
            "global": history.decode_global(global_buffer, snap.history_width),
            "layers": history.decode_layers(layer_buffer, snap.layer_history_width, table.stats.layers),
        }

    def _snapshot_tables(self) -> list[tuple[_Table, layout.Snapshot]]:
        with self._lock:
            tables = list(self._tables.values())
        return [(t, t.stats.snapshot()) for t in tables]


def _merge(older: VariableRecord, newer: VariableRecord) -> VariableRecord:
    """One variable seen through two variable lists: counts add up, the latest values come from ``newer``."""
    return newer._replace(
        steps=older.steps + newer.steps,
        missing_steps=older.missing_steps + newer.missing_steps,
        zero_steps=older.zero_steps + newer.zero_steps,
        nonfinite_steps=older.nonfinite_steps + newer.nonfinite_steps,
        missing_cause=newer.missing_cause or older.missing_cause,
        first_missing_step=older.first_missing_step or newer.first_missing_step,
        first_zero_step=older.first_zero_step or newer.first_zero_step,
        first_nonfinite_step=older.first_nonfinite_step or newer.first_nonfinite_step,
        recovered_missing_step=newer.recovered_missing_step or older.recovered_missing_step,
        recovered_zero_step=newer.recovered_zero_step or older.recovered_zero_step,
        recovered_nonfinite_step=newer.recovered_nonfinite_step or older.recovered_nonfinite_step,
    )


def nonfinite_origins(records: list[VariableRecord]) -> dict[str, tuple[int, list[VariableRecord]]]:
    """Per optimizer, the earliest step at which a gradient went non-finite and the variables that did then.

    A NaN spreads: once one variable's NaN gradient is applied, its value is NaN and every gradient computed
    through it is NaN one step later. The variables whose first non-finite step is the earliest are where it began.
    """
    origins: dict[str, tuple[int, list[VariableRecord]]] = {}
    for record in records:
        step = record.first_nonfinite_step
        if not step:
            continue
        best = origins.get(record.optimizer)
        if best is None or step < best[0]:
            origins[record.optimizer] = (step, [record])
        elif step == best[0]:
            best[1].append(record)
    return origins


#: Diagnoses kept per table for their zero hints (one per trace, or per eager missing set).
_DIAGNOSES_KEPT = 8


def _zero_hint(table: _Table, index: int) -> Any:
    """The newest diagnosis's hint for a variable whose gradient turned out all-zero, or None."""
    for diagnosis in reversed(list(table.diagnoses.values())):
        hint = diagnosis.zero_hints.get(index)
        if hint is not None:
            return hint
    return None


def _replica() -> int | None:
    """This replica's id under a strategy with several replicas in sync, else None (measure in the funnel)."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return int(replica) if replica is not None else 0
