"""What the gradient machinery does with each op type: pass the gradient on, stop it, or zero it.

The gradient registry answers most of it: ``tf.no_gradient`` ops are registered with None and unregistered ops
raise LookupError. A few ops are registered with a gradient function that always returns None, which the
registry cannot show; they are listed here from TensorFlow's math_grad.py. Integer, bool and string edges
are handled by the walker from the tensors' dtypes, not here.
"""

from __future__ import annotations

from functools import lru_cache

from tensorflow.python.framework import ops

#: Ops that read a variable: their first input is the variable's resource handle.
READ_OPS = frozenset({"ReadVariableOp", "ResourceGather", "ResourceGatherNd"})
#: Ops that write a variable: first input the handle, then the value written (after indices for a scatter or a
#: slice, which write part of it: the rest of the previous value stays).
ASSIGN_OPS = frozenset(
    {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "ResourceStridedSliceAssign"}
    | {f"ResourceScatter{kind}" for kind in ("Update", "Add", "Sub", "Mul", "Div", "Min", "Max")}
    | {f"ResourceScatterNd{kind}" for kind in ("Update", "Add", "Sub", "Min", "Max")}
)
#: Ops whose output depends only on an input's shape (or dtype), never on its values.
SHAPE_ONLY_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank", "ZerosLike", "OnesLike", "VariableShape"})
#: Ops that stop the gradient on purpose.
STOP_OPS = frozenset({"StopGradient", "PreventGradient"})
#: Ops registered with a gradient function that always returns None.
NONE_GRADIENT_OPS = frozenset({"Round", "Floor", "Ceil", "Rint", "ArgMax", "ArgMin", "FloorDiv"})
#: Ops whose gradient is zero almost everywhere.
ZERO_GRADIENT_OPS = frozenset({"Sign"})
#: Activations whose gradient is zero where the unit is inactive.
GATING_ACTIVATIONS = frozenset({"Relu", "Relu6"})
#: Clips: their gradient is exactly zero over whole ranges of inputs (a tanh's or a sigmoid's only at extremes).
CLIPPING_OPS = frozenset({"Minimum", "Maximum", "ClipByValue"})
#: Ops whose gradient is exactly zero where their input saturates or is clipped (a softmax whose output is exactly
#: one-hot): any of them after a ReLU can zero the gradient the ReLU receives. Not a select: Keras's Dropout is one,
#: and a dead ReLU is often followed by it.
SATURATING_OPS = GATING_ACTIVATIONS | frozenset({"Tanh", "Sigmoid", "Softmax", "Elu", "Selu"} | CLIPPING_OPS)
#: Ops whose output is all zero when their data input is (reshapes, casts, pools, a product): a ReLU's zeros stay
#: zeros through them. Not a concat, an add or a select: each may mix in values that are not zero.
ZERO_KEEPING_OPS = frozenset(
    {"Identity", "Reshape", "Transpose", "Squeeze", "ExpandDims", "Cast", "StridedSlice", "Slice", "Pad", "Mul"}
    | {"MaxPool", "MaxPoolV2", "MaxPool3D", "AvgPool", "AvgPool3D", "Mean", "Sum"}
)
#: Ops whose gradient for one operand is a product with the other: all zero when the other operand is all zero
#: (a kernel's gradient is its input times the gradient arriving).
MULTIPLYING_OPS = frozenset(
    {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Mul"}
    | {"Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput"}
)
#: Selects: one keeps a zero input zero when its other branch is a constant (Keras's Dropout: where(mask, x, 0)).
SELECT_OPS = frozenset({"SelectV2", "Select"})
#: Ops that make a constant: a select's other input made by one is (most likely) a dropout's zeros.
CONSTANT_OPS = frozenset({"Const", "ZerosLike", "Fill"})
#: Gating activations capped above too (a hard sigmoid's Relu6): a zero gradient may be the cap, not a dead unit.
CAPPED_ACTIVATIONS = frozenset({"Relu6"})
#: Ops that add a bias to a product (a layer's bias after its kernel).
ADDING_OPS = frozenset({"BiasAdd", "AddV2", "Add"})
#: tf.numpy_function: runs Python, registered without a gradient.
NUMPY_FUNCTION_OPS = frozenset({"PyFunc", "PyFuncStateless"})
#: Ops registered with a gradient that may still be None because it depends on user code (tf.py_function).
USER_GRADIENT_OPS = frozenset({"EagerPyFunc"})


@lru_cache(maxsize=1024)
def blocking_category(op_type: str) -> str | None:
    """The missing-gradient category an op of this type causes on every path through it, or None if it
    passes gradients (subject to the dtypes of its inputs and outputs)."""
    if op_type in STOP_OPS:
        return "stop_gradient"
    if op_type in ASSIGN_OPS:
        return "stateful_assign"
    if op_type in NONE_GRADIENT_OPS or op_type in NUMPY_FUNCTION_OPS:
        return "non_differentiable_op"
    try:
        registered = ops.gradient_registry.lookup(op_type)
    except LookupError:
        return "non_differentiable_op"
    return "non_differentiable_op" if registered is None else None


def describe_op(op_type: str) -> str:
    """A short user-facing name for an op that cuts or zeroes a path."""
    if op_type in NUMPY_FUNCTION_OPS:
        return f"{op_type} (tf.numpy_function)"
    if op_type in USER_GRADIENT_OPS:
        return f"{op_type} (tf.py_function)"
    return op_type
