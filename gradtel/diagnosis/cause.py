"""The result types of a diagnosis and the wording of their explanations."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gradtel.diagnosis.op_rules import CAPPED_ACTIVATIONS
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


@dataclass(frozen=True)
class ReluCheck:
    """One ReLU on a variable's gradient path, with the variables whose gradients tell whether it was dead in a step
    (``classify.relu_witnesses``); ``next``: the next ReLU towards the loss.

    ``direct``: variables that multiply its output (through ops that keep zeros zero, ``ZERO_KEEPING_OPS``) and are
    used nowhere else: their gradient is the ReLU's output times the gradient arriving, so it is zero when the ReLU
    is dead and not zero only when it is not. ``biases``: variables added to such a product (the next layer's bias):
    their gradient is the gradient arriving there, whatever the ReLU output. ``used``: every variable used between
    it and the next op that can zero a gradient (``SATURATING_OPS``), the others included. ``gated``: that stretch
    ends at such an op. ``unchecked``: a next ReLU was not worked out (``next`` None).
    """

    op: str
    location: str | None
    direct: frozenset[int]
    biases: frozenset[int]
    used: frozenset[int]
    gated: bool
    next: ReluCheck | None = None
    unchecked: bool = False

    @property
    def reached(self) -> frozenset[int]:
        """The variables whose gradient shows that a gradient reached this ReLU's output side: the bias added to
        the product with its output; without one, the other variables used after it."""
        return self.biases or self.used - self.direct


_RESOLVING = threading.Lock()


@dataclass
class Diagnosis:
    """Causes for the None gradients of one optimizer step, and hints for gradients that may be zero.

    Both are keyed by the index of the variable in the list given to the optimizer. The hints of a traced step with
    no missing gradient are worked out when first asked for (``resolve``: a zero gradient showed up, from the
    exporter's or the report's thread), not while the step is traced: most steps never need them.
    ``witnesses``: for a ``dead_activation`` hint, the ReLU nearest the variable on its gradient path, chained to
    the next ones (``classify.relu_witnesses``; no entry: nothing to check), read by ``settle_zero_hints``.
    """

    causes: dict[int, Cause] = field(default_factory=dict)
    hints: dict[int, Cause] = field(default_factory=dict)
    witnesses: dict[int, ReluCheck] = field(default_factory=dict)
    resolve: Callable[[], tuple[dict[int, Cause], dict[int, ReluCheck]]] | None = None

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
    hints: dict[int, tuple[Cause | None, ReluCheck | None]], zero: set[int], names: Sequence[str]
) -> dict[int, Cause | None]:
    """The causes of one step's all-zero gradients (``zero``), from each one's hint and its ReLUs' witnesses.

    Why: a ``dead_activation`` hint is structural (every path from the variable to the loss crosses a ReLU); the
    zero is what happened, and the step's other gradients tell which ReLU, if any, output only zeros. A dead ReLU
    still passes the gradient it receives to what comes after it (a bias's gradient does not depend on the ReLU's
    output), while the weights that multiply its zeros get none. So, from the ReLU nearest the variable towards the
    loss (``_dead_relu``): a weight multiplying its output has a gradient, so it did not output only zeros and a
    gradient reached the layer after it (the zero comes from that layer's weights); everything after it is zero
    too, so the zero reached it from nearer the loss (a saturated tanh or sigmoid, a loss constant for the batch,
    or a dead ReLU further on); a variable after it has a gradient while it passes none back: that ReLU is dead, and
    it is named. With none found dead the cause is ``other``, naming what was seen. A ReLU with nothing after it to
    tell (an output ReLU) keeps the hint, as does a chain not worked out; a Relu6 there reads ``other`` (its zero
    may be its cap at 6, a hard sigmoid's).
    """
    settled: dict[int, Cause | None] = {}
    for i, (hint, check) in hints.items():
        settled[i] = hint
        if hint is None or hint.category != ZeroCause.DEAD_ACTIVATION or check is None:
            continue
        dead, seen = _dead_relu(check, zero, names)
        if dead is None and seen is None:
            continue  # the hint stands
        if dead is not None:
            if dead.reached - zero:  # else nothing after it tells: the hint stands
                settled[i] = make_cause(
                    ZeroCause.DEAD_ACTIVATION,
                    f"`{names[i]}` reaches the loss through a {dead.op} that output only zeros in this step: "
                    f"{_dead_evidence(dead, zero, names)}",
                    op=dead.op,
                    location=dead.location,
                )
            continue
        settled[i] = make_cause(
            ZeroCause.OTHER,
            f"Every path from `{names[i]}` to the loss crosses a {hint.op or 'ReLU'} (at {hint.location}), but {seen}: "
            "the zero does not come from a dead activation",
        )
    _blame_zero_inputs(settled, [check for hint, check in hints.values() if check is not None], zero, names)
    return settled


def _blame_zero_inputs(
    settled: dict[int, Cause | None], chains: Sequence[ReluCheck], zero: set[int], names: Sequence[str]
) -> None:
    """A weight that multiplies the output of a ReLU this step shows dead has a zero gradient for that reason (its
    gradient is that output times the gradient arriving), whatever its own path to the loss: say so."""
    seen: set[int] = set()
    for check in chains:
        current: ReluCheck | None = check
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            live = sorted(current.reached - zero)
            if current.direct and current.direct <= zero and live:
                for j in sorted(current.direct):
                    found = settled.get(j)
                    if found is None or found.category != ZeroCause.DEAD_ACTIVATION:
                        settled[j] = make_cause(
                            ZeroCause.DEAD_ACTIVATION,
                            f"`{names[j]}` multiplies the output of a {current.op} that output only zeros in this "
                            f"step (`{names[live[0]]}` after it has a gradient): its gradient, that output times the "
                            "gradient arriving, is zero",
                            op=current.op,
                            location=current.location,
                        )
            current = current.next


def _dead_relu(check: ReluCheck, zero: set[int], names: Sequence[str]) -> tuple[ReluCheck | None, str | None]:
    """Along the chain from ``check``: (the ReLU this step's gradients show dead, None); (None, what was seen
    instead) when none is; (None, None) when the chain cannot tell (the hint stands)."""
    alive: str | None = None  # a ReLU shown to pass values, and a gradient to reach the layer after it
    quiet: str | None = None  # a ReLU after which every gradient is zero too
    current: ReluCheck | None = check
    while current is not None:
        passing = sorted(current.direct - zero)
        if passing:
            alive = alive or (
                f"`{names[passing[0]]}`, which multiplies the output of the {current.op} at {current.location}, has a "
                "gradient: that ReLU did not output only zeros, and a gradient reached the layer after it (weights "
                "there that are all zero, as a zeros initializer leaves them, would explain the zero)"
            )
        elif current.reached - zero:
            return current, None
        elif current.used or current.gated:
            quiet = quiet or (
                f"the gradients used after it are zero too (`{names[min(current.used)]}`)"
                if current.used
                else "another op that can zero a gradient (a clip, tanh or sigmoid) follows it with no layer between"
            )
        elif alive or current.op in CAPPED_ACTIVATIONS:  # nothing after it to tell; a capped one may be at its cap
            return None, alive or (
                f"nothing after the {current.op} at {current.location} tells whether its units were below 0 or "
                "above 6 (a hard sigmoid's cap)"
            )
        else:  # nothing after this ReLU to tell: it stays the suspect
            return current, None
        if current.unchecked:
            return None, None
        current = current.next
    return None, alive or quiet


def _dead_evidence(dead: ReluCheck, zero: set[int], names: Sequence[str]) -> str:
    """Why this ReLU reads as dead: a variable after it has a gradient (and the weights on its output have none)."""
    live = sorted(dead.reached - zero)
    if dead.direct:
        weight = names[min(dead.direct)]
        return f"`{names[live[0]]}` after it has a gradient while `{weight}`, which multiplies its output, has none"
    return f"`{names[live[0]]}` after it has a gradient, so one reaches it, while the variables before it get none"
