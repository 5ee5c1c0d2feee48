"""The result types of a diagnosis and the wording of their explanations."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gradtel.vocabulary import CauseName, MissingCause, ZeroCause, cause, fix_for

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


def settle_zero_hints(
    hints: dict[int, Cause | None], every_gradient_zero: bool, names: Sequence[str]
) -> dict[int, Cause | None]:
    """The hints of one step's all-zero gradients (by variable index; None: no gating op on its paths), checked
    against each other.

    Why: a hint is structural (every path from the variable crosses a ReLU), the zero is what happened. A dead ReLU
    zeroes the gradients of the variables before it, never every gradient of the step: the bias of a layer after
    it still gets one. So when every gradient of the step is zero and one with no hint is among them (its zero came
    from nearer the loss: a saturated output, a loss constant for this batch), the ReLU on the others' paths
    explains nothing, and their cause is ``other``.
    """
    witness = next((i for i, h in hints.items() if h is None), None) if every_gradient_zero else None
    if witness is None:
        return hints
    settled = dict(hints)
    for i, hint in hints.items():
        if hint is not None and hint.category == ZeroCause.DEAD_ACTIVATION:
            settled[i] = make_cause(
                ZeroCause.OTHER,
                f"Every path from `{names[i]}` to the loss crosses a {hint.op or 'ReLU'}, but every gradient of "
                f"this step is zero, `{names[witness]}`'s too, whose paths cross none: the zero comes from nearer "
                "the loss, not from a dead activation",
            )
    return settled
