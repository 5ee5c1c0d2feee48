"""The tables of one optimizer: one per distinct variable list it was given, and the variables' display names.

An optimizer usually gets one list for the whole run; a GAN-like loop or a model that changes gives several. Each
list gets its own in-graph ``StatsTable`` (gradtel/stats.py) plus what the diagnosis said about its variables,
keyed by the ids of the variables in order, so a trace finds its table with one dict lookup.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gradtel import layout
from gradtel.naming import PatternSet, layer_of, unique_names, variable_path

if TYPE_CHECKING:
    from gradtel.diagnosis.cause import Cause, ReluCheck

#: Diagnoses kept per table for their zero hints (one per trace, or per eager missing set).
DIAGNOSES_KEPT = 8


@dataclass
class VariableTable:
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

    def keep_diagnosis(self, diagnosis: Any) -> None:
        """Record one diagnosis of this list: its causes, and the diagnosis itself (the newest few) for zero hints."""
        self.causes.update(diagnosis.causes)
        self.diagnoses.pop(id(diagnosis), None)
        self.diagnoses[id(diagnosis)] = diagnosis
        while len(self.diagnoses) > DIAGNOSES_KEPT:
            del self.diagnoses[next(iter(self.diagnoses))]

    def _zero_hint(self, index: int) -> tuple[Cause | None, ReluCheck | None]:
        """The newest diagnosis's hint for a variable whose gradient turned out all-zero (None if none), and its
        witnesses in that diagnosis (None: none needed)."""
        for diagnosis in reversed(list(self.diagnoses.values())):
            hint = diagnosis.zero_hints.get(index)
            if hint is not None:
                return hint, diagnosis.witnesses.get(index)
        return None, None

    def zero_causes(self, states: np.ndarray) -> dict[int, Cause | None]:
        """The causes of one step's all-zero gradients (``states``: the table's STATE row), by variable index: each
        variable's hint, checked against the step's other zeros (``settle_zero_hints``)."""
        from gradtel.diagnosis.cause import settle_zero_hints

        zero = {int(i) for i in np.flatnonzero(states == layout.STATE_ZERO)}
        return settle_zero_hints({i: self._zero_hint(i) for i in zero}, zero, self.names)


class Tables:
    """One optimizer's tables, and the display names of its variables (stable for the handle's life)."""

    def __init__(self, optimizer: str, expect_missing: PatternSet, max_abs: bool) -> None:
        self._optimizer = optimizer
        self._expect_missing = expect_missing
        self._max_abs = max_abs
        self._lock = threading.Lock()
        self.by_key: dict[tuple[int, ...], VariableTable] = {}
        self._names: dict[int, str] = {}  # id(variable) -> display name
        self._variables: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._taken: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, variables: Sequence[Any]) -> VariableTable | None:
        """The table of this variable list, if a step with it was seen."""
        return self.by_key.get(tuple(id(v) for v in variables))

    def table_for(self, variables: Sequence[Any]) -> VariableTable:
        """The table of this variable list, built (with its in-graph variables) on its first step."""
        key = tuple(id(v) for v in variables)
        with self._lock:
            table = self.by_key.get(key)
            if table is None:
                new = [v for v in variables if id(v) not in self._names]
                for v, display in zip(new, unique_names([variable_path(v) for v in new], self._taken), strict=True):
                    self._names[id(v)] = display
                    with contextlib.suppress(TypeError):  # not weak-referenceable: not listed by variables()
                        self._variables[id(v)] = v
                names = [self._names[id(v)] for v in variables]
                from gradtel import stats

                table = VariableTable(
                    stats=None,
                    variable_ids=key,
                    names=names,
                    layers=[layer_of(variable_path(v)) for v in variables],
                    expected=[self._expect_missing.matches(n) for n in names],
                )
                table.stats = stats.StatsTable(
                    len(variables), f"{self._optimizer}_{len(self.by_key)}", self._max_abs, table.layers, table.expected
                )
                self.by_key[key] = table
            return table

    def variables(self) -> list[Any]:
        """The live variables seen (weak references: gradtel keeps none alive)."""
        return list(self._variables.values())

    def snapshots(self) -> list[tuple[VariableTable, layout.Snapshot]]:
        """One read of each table."""
        with self._lock:
            tables = list(self.by_key.values())
        return [(t, t.stats.snapshot()) for t in tables]
