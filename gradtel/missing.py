"""Reporting missing gradients: the diagnosis of a step's None gradients, the warning, and Keras's error enriched.

Keras says only "Gradients do not exist for variables [...]" or "No gradients provided for any variable". This
module attaches gradtel's diagnosis (gradtel/diagnosis/) to the variable list's table, warns once per new set of
unexpectedly missing gradients naming each cause, and appends the causes to Keras's error when every gradient is
missing. It never measures anything: that is gradtel/recording.py.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gradtel.tables import Tables, VariableTable
from gradtel.vocabulary import MissingCause


class MissingGradientWarning(UserWarning):
    """Some (not all) gradients are None: which variables, and why."""


class MissingGradientReporter:
    """Diagnoses, warns about and explains one optimizer's missing gradients."""

    def __init__(self, optimizer: str, diagnoser: Any, log_failure: Callable[[str], None]) -> None:
        self._optimizer = optimizer
        self._diagnoser = diagnoser
        self._log_failure = log_failure

    def diagnose(self, table: VariableTable, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """Why gradients are None (graph: once per trace; eager: cheap unless the missing set is new)."""
        if self._diagnoser is None:
            return
        try:
            table.keep_diagnosis(self._diagnoser.diagnose(list(grads), list(variables)))
            self._warn_partial(table, [i for i, g in enumerate(grads) if g is None], len(grads))
        except Exception:
            self._log_failure("diagnosing missing gradients")

    def _warn_partial(self, table: VariableTable, missing: list[int], total: int) -> None:
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
                f"{self._optimizer!r}; they are not training:\n" + "\n".join(cause_lines(table, unexpected))
            ),
            stacklevel=2,
        )

    @contextlib.contextmanager
    def enriched_errors(self, tables: Tables, variables: Sequence[Any] | None) -> Iterator[None]:
        """Keras's 'No gradients provided for any variable' error, followed by gradtel's explanation; any error of a
        step whose replicas disagreed on which gradients exist is kept for the report, and re-raised unchanged."""
        try:
            yield
        except Exception as error:
            no_gradients = isinstance(error, ValueError) and str(error).startswith("No gradients provided")
            table = None
            with contextlib.suppress(Exception):
                table = tables.get(variables) if variables is not None else None
                # The report and the gate keep the diagnosis of a step that never ran: every gradient None, or
                # replicas that disagree on which exist (Keras 3's update then fails, an AssertionError).
                if table is not None and (no_gradients or table.disagreement):
                    table.raised = (str(error) or type(error).__name__).splitlines()[0]
            if not no_gradients or variables is None:
                raise
            raise ValueError(f"{error}\n{explain_all_missing(table, len(variables))}") from error


def cause_lines(table: VariableTable, indices: Sequence[int]) -> list[str]:
    """One line per variable: its name and diagnosed cause."""
    lines = []
    for i in indices:
        cause = table.causes.get(i)
        if cause is None:
            lines.append(f"  - {table.names[i]}: cause not diagnosed")
        else:
            where = f" at {cause.location}" if cause.location else ""
            lines.append(f"  - {table.names[i]}: {cause.category}{where}: {cause.explanation}")
    return lines


def explain_all_missing(table: VariableTable | None, n_variables: int) -> str:
    """The text appended to Keras's error when every gradient of a step is missing."""
    if table is None:
        return "gradtel: every gradient is missing (not diagnosed)."
    return "\n".join(["gradtel: every gradient is missing:", *cause_lines(table, range(n_variables))])
