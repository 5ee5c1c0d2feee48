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
    ``witnesses``: for a ``dead_activation`` hint, the variables used between its ReLU and the next op that can
    zero a gradient (``classify.relu_witnesses``; no entry: nothing to check), read by ``settle_zero_hints``.
    """

    causes: dict[int, Cause] = field(default_factory=dict)
    hints: dict[int, Cause] = field(default_factory=dict)
    witnesses: dict[int, frozenset[int]] = field(default_factory=dict)
    resolve: Callable[[], tuple[dict[int, Cause], dict[int, frozenset[int]]]] | None = None

    @property
    def zero_hints(self) -> dict[int, Cause]:
        """The hints, worked out now if they were deferred (never raises: a failure leaves none)."""
        if self.resolve is not None:
            with _RESOLVING:
                if self.resolve is not None:
                    try:
                        self.hints, self.witnesses = self.resolve()
                    except Exception:
                        self.hints, self.witnesses = {}, {}
                    self.resolve = None
        return self.hints


def make_cause(category: str, detail: str, op: str | None = None, location: str | None = None) -> Cause:
    """A cause whose explanation is the specific finding followed by the category's generic fix."""
    where = f" ({location})" if location else ""
    return Cause(cause(category), op, location, f"{detail}{where}. {fix_for(category)}")


def settle_zero_hints(
    hints: dict[int, tuple[Cause | None, frozenset[int] | None]], zero: set[int], names: Sequence[str]
) -> dict[int, Cause | None]:
    """The causes of one step's all-zero gradients (``zero``), from each one's hint and the hint's witnesses.

    Why: a ``dead_activation`` hint is structural (every path from the variable to the loss crosses a ReLU); the
    zero is what happened. A dead ReLU outputs zeros, but the gradient still reaches it: the layers used after it
    get one (a bias's gradient does not depend on the ReLU's output at all). So when every variable used after the
    ReLU, up to the next op that can zero a gradient (its witnesses), is zero too, the zero came from nearer the
    loss (a saturated tanh, sigmoid or clip after it, a loss constant for this batch): the ReLU explains nothing,
    and the cause is ``other``. So too when that stretch holds no variable but ends at such an op (no witness
    either way). ``witnesses`` None: the ReLU is the last thing that can zero the gradient; the hint stands.
    """
    settled: dict[int, Cause | None] = {}
    for i, (hint, witnesses) in hints.items():
        settled[i] = hint
        if hint is None or hint.category != ZeroCause.DEAD_ACTIVATION or witnesses is None or not witnesses <= zero:
            continue
        if witnesses:
            after = f"the gradients used after it are zero too (`{names[min(witnesses)]}`)"
        else:
            after = "another op that can zero a gradient (a clip, tanh or sigmoid) follows it with no layer between"
        settled[i] = make_cause(
            ZeroCause.OTHER,
            f"Every path from `{names[i]}` to the loss crosses a {hint.op or 'ReLU'} (at {hint.location}), but "
            f"{after}: the zero may come from nearer the loss, not from a dead activation",
        )
    return settled
