"""The reproduction corpus: each case builds a real missing-gradient bug and states what must be diagnosed.

A case is a setup function that creates the variables and inputs (eagerly, outside any tf.function) and
returns a ``step`` that runs the training step's forward pass and ``tape.gradient`` and returns
``(grads, variables)`` as they would be given to the optimizer. The runner executes ``step`` eagerly or
inside a tf.function and calls ``Diagnoser.diagnose`` the way gradtel's optimizer wrapper does.

The culprit line is the one marked ``# CULPRIT`` in the case's source.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Step = Callable[[], tuple[list, list]]
MODES = ("eager", "graph")


@dataclass(frozen=True)
class Expectation:
    """What one mode must report: category per variable-name suffix, the op, and zero hints."""

    missing: dict[str, str]
    op: str | None = None
    located: bool = True
    zero_hints: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One reproduction and its expected diagnosis per mode (a mode without an expectation is not run)."""

    name: str
    setup: Callable[[], Step]
    expect: dict[str, Expectation]
    source: str

    def culprit(self) -> tuple[str, int] | None:
        """(file, line) of the ``# CULPRIT`` marker in the case's source."""
        lines, first = inspect.getsourcelines(self.setup)
        for offset, line in enumerate(lines):
            if "# CULPRIT" in line:
                return inspect.getsourcefile(self.setup) or "", first + offset
        return None


CASES: list[Case] = []


def case(
    *, source: str, eager: Expectation | None = None, graph: Expectation | None = None, both: Expectation | None = None
) -> Callable[[Callable[[], Step]], Callable[[], Step]]:
    """Register a reproduction; ``both`` applies to eager and graph mode unless one is given."""

    def register(setup: Callable[[], Step]) -> Callable[[], Step]:
        expect = {mode: e for mode, e in (("eager", eager or both), ("graph", graph or both)) if e}
        CASES.append(Case(setup.__name__, setup, expect, source))
        return setup

    return register


def cases_for(mode: str) -> list[Any]:
    """(case) parameters for one mode."""
    return [c for c in CASES if mode in c.expect]
