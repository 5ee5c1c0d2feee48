"""The result types of a diagnosis and the wording of their explanations."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gradtel.vocabulary import CauseName, MissingCause, cause, fix_for

#: Category used when the diagnosis itself failed or had nothing to go on.
UNKNOWN = MissingCause.UNKNOWN


@dataclass(frozen=True)
class Cause:
    """Why one variable's gradient is missing (or would be zero), and where in the user's code."""

    category: CauseName
    op: str | None
    location: str | None
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with keys category (a plain string), op, location and explanation."""
        return {**asdict(self), "category": str(self.category)}


_RESOLVING = threading.Lock()


@dataclass
class Diagnosis:
    """Causes for the None gradients of one optimizer step, and hints for gradients that may be zero.

    Both are keyed by the index of the variable in the list given to the optimizer. The hints of a traced step with
    no missing gradient are worked out when first asked for (``resolve``: a zero gradient showed up, from the
    exporter's or the report's thread), not while the step is traced: most steps never need them.
    """

    causes: dict[int, Cause] = field(default_factory=dict)
    hints: dict[int, Cause] = field(default_factory=dict)
    resolve: Callable[[], dict[int, Cause]] | None = None

    @property
    def zero_hints(self) -> dict[int, Cause]:
        """The hints, worked out now if they were deferred (never raises: a failure leaves none)."""
        if self.resolve is not None:
            with _RESOLVING:
                if self.resolve is not None:
                    try:
                        self.hints = self.resolve()
                    except Exception:
                        self.hints = {}
                    self.resolve = None
        return self.hints


def make_cause(category: str, detail: str, op: str | None = None, location: str | None = None) -> Cause:
    """A cause whose explanation is the specific finding followed by the category's generic fix."""
    where = f" ({location})" if location else ""
    return Cause(cause(category), op, location, f"{detail}{where}. {fix_for(category)}")
