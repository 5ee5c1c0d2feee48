"""gradtel's vocabulary: the states of a gradient, the causes of an unhealthy one, and the report's findings.

These names are part of gradtel's interface: they are the values of the ``state`` label of ``gradtel_variables``
and of the ``cause`` label of ``gradtel_gradient_missing_total``, the report's ``status`` and ``category`` fields,
and what the dashboards, the alert rules and the runbooks select and explain. Every one of those reads them from
here (or is checked against here by a test), so a copy cannot drift. Adding a cause is one member and its fix
here, its row in docs/runbooks.md and its name in docs/report.md (tests/observability/test_vocabulary.py fails
until both are there), and the diagnosis rule that finds it.

The enums are ``str`` subclasses whose ``str()`` is the value, so a member compares equal to its name, serializes
to JSON as one, and formats as one in a label or an f-string (``enum.StrEnum`` without requiring Python 3.11).
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING


class Name(str, Enum):
    """A member that is its value wherever a string is expected (Python 3.10's stand-in for ``enum.StrEnum``)."""

    if not TYPE_CHECKING:  # typing sees Enum's signatures; these are the same methods with str's behaviour
        # str's own methods, not Enum's: the member's characters are its value, and these run per record of a
        # 10,000-variable report (``.value`` is a Python-level property, several times slower).
        __str__ = str.__str__
        __format__ = str.__format__


class State(Name):
    """A variable's state at its latest step: the ``state`` label of ``gradtel_variables``, the report's status."""

    OK = "ok"
    MISSING = "missing"  # the gradient was None
    ZERO = "zero"  # every element was exactly 0
    NONFINITE = "nonfinite"  # NaN or Inf
    EXPECTED_MISSING = "expected_missing"  # None, for a variable declared with expect_missing
    REPLICA_DISAGREEMENT = "replica_disagreement"  # a gradient on some replicas, None on others

    @property
    def unhealthy(self) -> bool:
        """Whether the state is a fault: not ok, and not declared expected."""
        return self not in (State.OK, State.EXPECTED_MISSING)


#: The unhealthy states, in declaration order (what a dashboard's "unhealthy variables" selects).
UNHEALTHY_STATES: tuple[State, ...] = tuple(s for s in State if s.unhealthy)


class MissingCause(Name):
    """Why a gradient is missing (None): the ``cause`` label of ``gradtel_gradient_missing_total``."""

    LOSS_DISCONNECTED = "loss_disconnected"
    UNUSED = "unused"
    OUTSIDE_TAPE = "outside_tape"
    NOT_ON_LOSS_PATH = "not_on_loss_path"
    STOP_GRADIENT = "stop_gradient"
    NON_DIFFERENTIABLE_OP = "non_differentiable_op"
    LEFT_TENSORFLOW = "left_tensorflow"
    STATEFUL_ASSIGN = "stateful_assign"
    NOT_TRAINABLE = "not_trainable"
    INTEGER_DTYPE = "integer_dtype"
    UNKNOWN = "unknown"  # the diagnosis failed, had nothing to go on, or has not run yet

    @property
    def fix(self) -> str:
        return MISSING_CAUSES[self]


class ZeroCause(Name):
    """Why a gradient is all zero (the report's cause of a ``zero`` variable; no metric label)."""

    ZERO_GRADIENT_OP = "zero_gradient_op"
    UNTAKEN_BRANCH = "untaken_branch"
    UNDERFLOW = "underflow"
    DEAD_ACTIVATION = "dead_activation"
    OTHER = "other"

    @property
    def fix(self) -> str:
        return ZERO_CAUSES[self]


class Finding(Name):
    """Report finding categories that are not causes (a finding's category is one of these or a cause)."""

    NONFINITE = State.NONFINITE.value
    EXPECTED_MISSING = State.EXPECTED_MISSING.value
    REPLICA_DISAGREEMENT = State.REPLICA_DISAGREEMENT.value
    UNTRACKED_VARIABLE = "untracked_variable"
    NONFINITE_ORIGIN = "nonfinite_origin"
    NOT_OPTIMIZED = "not_optimized"  # a note, not a fault


#: A cause of a missing gradient, with a one-sentence fix each.
MISSING_CAUSES: dict[str, str] = {
    MissingCause.LOSS_DISCONNECTED: "The loss depends on no trainable variable at all (for example a loss built "
    "from y_true only); compute the loss from the model's outputs.",
    MissingCause.UNUSED: "The variable was not read during the step (a layer defined but never called, a branch "
    "not taken, a variable re-created on each call, another model's variables); call the layer in the forward "
    "pass or stop passing the variable to the optimizer.",
    MissingCause.OUTSIDE_TAPE: "The variable was read, but not while the GradientTape was recording; run the "
    "forward pass and the loss inside `with tf.GradientTape()` (not in build() or before the tape).",
    MissingCause.NOT_ON_LOSS_PATH: "The variable is read inside the tape but its results never reach the loss (an "
    "output without a loss, a value used only for metrics); add it to the loss or declare it with expect_missing.",
    MissingCause.STOP_GRADIENT: "The path to the loss is cut by tf.stop_gradient; remove it if this variable "
    "should train.",
    MissingCause.NON_DIFFERENTIABLE_OP: "The path to the loss goes through an op without a gradient (argmax, "
    "round, comparison, cast to integer, numpy_function); use a differentiable surrogate (softmax, "
    "straight-through estimator) or keep the path in floating point.",
    MissingCause.LEFT_TENSORFLOW: "The path leaves TensorFlow (.numpy(), NumPy maths, model.predict inside the "
    "tape), so the tape cannot follow it; use TensorFlow ops and call the model directly.",
    MissingCause.STATEFUL_ASSIGN: "The value reaches the loss through Variable.assign, which is written, not "
    "differentiated; use the computed tensor instead of assigning it to a variable.",
    MissingCause.NOT_TRAINABLE: "The variable has trainable=False, so the tape does not watch it; pass only "
    "trainable variables to the optimizer (model.trainable_variables, not model.variables: a BatchNorm's moving "
    "statistics are updated by assignment, not trained), or set trainable=True if it should train.",
    MissingCause.INTEGER_DTYPE: "The variable is integer or boolean and cannot have a gradient; make it floating "
    "point or do not pass it to the optimizer.",
    MissingCause.UNKNOWN: "gradtel could not determine why this gradient is missing.",
}

#: A cause of an all-zero gradient, with a one-sentence fix each.
ZERO_CAUSES: dict[str, str] = {
    ZeroCause.ZERO_GRADIENT_OP: "An op on the path has a zero gradient almost everywhere (tf.sign, floor); use a "
    "differentiable surrogate.",
    ZeroCause.UNTAKEN_BRANCH: "The variable is only used in a tf.cond/tf.case branch that was not taken at this step.",
    ZeroCause.UNDERFLOW: "float16 gradients underflowed to zero; use a LossScaleOptimizer (mixed_float16 policy).",
    ZeroCause.DEAD_ACTIVATION: "Every unit feeding from this variable is inactive (dead ReLU); lower the learning "
    "rate, use LeakyReLU/GELU or re-initialise.",
    ZeroCause.OTHER: "The gradient is exactly zero, and gradtel found no op on the path that explains it: check "
    "what multiplies it on the way to the loss (a mask or weight that is all zero, a saturated sigmoid/tanh, a "
    "value clipped by tf.clip_by_value/minimum/maximum, a loss that is exactly 0 for this batch); print the "
    "layer's output and the loss for one batch to find which.",
}

#: A cause of an unhealthy gradient, missing or zero.
CauseName = MissingCause | ZeroCause


def cause(category: str) -> CauseName:
    """The cause named ``category``; a clear error for a name that is none (the label must stay bounded)."""
    if category in MISSING_CAUSES:
        return MissingCause(category)
    if category in ZERO_CAUSES:
        return ZeroCause(category)
    raise ValueError(f"{category!r} is not a gradtel cause; expected one of {', '.join(map(str, ALL_CAUSES))}")


def fix_for(category: str) -> str:
    """The one-sentence explanation and fix for a cause category (the unknown cause's for any other name)."""
    return MISSING_CAUSES.get(category) or ZERO_CAUSES.get(category) or MISSING_CAUSES[MissingCause.UNKNOWN]


#: Every cause, missing then zero.
ALL_CAUSES: tuple[CauseName, ...] = (*MissingCause, *ZeroCause)
