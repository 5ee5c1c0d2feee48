"""Uniform access to Keras 3, tf_keras and plain TensorFlow variables.

Keras 3 wraps a ``tf.Variable`` (``._value``) and names it by ``.path``; tf_keras mixed precision wraps one in
an ``AutoCastVariable`` (``._variable``); the tape, the captures of a FuncGraph and the eager recorder all see
the innermost ``tf.Variable`` and its resource handle, so identity is decided there.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def underlying(variable: Any) -> Any:
    """The innermost ``tf.Variable`` of a (possibly wrapped) variable."""
    seen = 0
    while seen < 4:
        inner = getattr(variable, "_value", None)
        if not isinstance(inner, tf.Variable):
            inner = getattr(variable, "_variable", None)
        if not isinstance(inner, tf.Variable) or inner is variable:
            return variable
        variable, seen = inner, seen + 1
    return variable


def identity(variable: Any) -> int:
    """A key that is equal for a variable and all its wrappers."""
    return id(underlying(variable))


def handle(variable: Any) -> Any | None:
    """The resource handle tensor of a variable, or None when it has none (not a resource variable)."""
    try:
        return underlying(variable).handle
    except Exception:
        return None


def is_trainable(variable: Any) -> bool:
    """``variable.trainable``, True when the object does not say."""
    return bool(getattr(variable, "trainable", True))


def dtype_of(variable: Any) -> Any:
    """The variable's dtype (None when it has none)."""
    return getattr(variable, "dtype", None)
