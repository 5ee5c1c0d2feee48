"""Root-cause categories for unhealthy gradients: their names and the fix each one calls for.

The names are part of gradtel's interface: they appear in the report, in errors, and as the bounded
``cause`` label of ``gradtel_gradient_missing_total`` (so a dashboard can show "missing, by cause").
"""

from __future__ import annotations

#: Causes of a missing (None) gradient, with a one-sentence fix each.
MISSING_CAUSES: dict[str, str] = {
    "loss_disconnected": "The loss depends on no trainable variable at all (for example a loss built from "
    "y_true only); compute the loss from the model's outputs.",
    "unused": "The variable was not read during the step (a layer defined but never called, a branch not "
    "taken, a variable re-created on each call, another model's variables); call the layer in the forward "
    "pass or stop passing the variable to the optimizer.",
    "outside_tape": "The variable was read, but not while the GradientTape was recording; run the forward "
    "pass and the loss inside `with tf.GradientTape()` (not in build() or before the tape).",
    "not_on_loss_path": "The variable is read inside the tape but its results never reach the loss (an output "
    "without a loss, a value used only for metrics); add it to the loss or declare it with expect_missing.",
    "stop_gradient": "The path to the loss is cut by tf.stop_gradient; remove it if this variable should "
    "train.",
    "non_differentiable_op": "The path to the loss goes through an op without a gradient (argmax, round, "
    "comparison, cast to integer, numpy_function); use a differentiable surrogate (softmax, straight-through "
    "estimator) or keep the path in floating point.",
    "left_tensorflow": "The path leaves TensorFlow (.numpy(), NumPy maths, model.predict inside the tape), so "
    "the tape cannot follow it; use TensorFlow ops and call the model directly.",
    "stateful_assign": "The value reaches the loss through Variable.assign, which is written, not "
    "differentiated; use the computed tensor instead of assigning it to a variable.",
    "not_trainable": "The variable has trainable=False, so the tape does not watch it; set trainable=True or "
    "do not pass it to the optimizer.",
    "integer_dtype": "The variable is integer or boolean and cannot have a gradient; make it floating point "
    "or do not pass it to the optimizer.",
    "unknown": "gradtel could not determine why this gradient is missing.",
}

#: Causes of an all-zero gradient.
ZERO_CAUSES: dict[str, str] = {
    "zero_gradient_op": "An op on the path has a zero gradient almost everywhere (tf.sign, floor); use a "
    "differentiable surrogate.",
    "untaken_branch": "The variable is only used in a tf.cond/tf.case branch that was not taken at this step.",
    "underflow": "float16 gradients underflowed to zero; use a LossScaleOptimizer (mixed_float16 policy).",
    "dead_activation": "Every unit feeding from this variable is inactive (dead ReLU); lower the learning "
    "rate, use LeakyReLU/GELU or re-initialise.",
    "other": "The gradient is exactly zero, and gradtel found no op on the path that explains it: check what "
    "multiplies it on the way to the loss (a mask or weight that is all zero, a saturated sigmoid/tanh, a value "
    "clipped by tf.clip_by_value/minimum/maximum, a loss that is exactly 0 for this batch); print the layer's "
    "output and the loss for one batch to find which.",
}

#: Label value for variables that are not missing (the cause label exists only on the missing counter).
NO_CAUSE = "none"


def fix_for(category: str) -> str:
    """The one-sentence explanation and fix for a cause category."""
    return MISSING_CAUSES.get(category) or ZERO_CAUSES.get(category) or MISSING_CAUSES["unknown"]
