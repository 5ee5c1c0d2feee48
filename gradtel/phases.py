"""The phase of the training process, exported as ``gradtel_phase`` so that a pause is not taken for a hang.

A job that evaluates or writes a checkpoint for 16 minutes takes no optimizer step, exactly like a hung one. The
Keras callbacks set the phase from their hooks (``evaluate`` between ``on_test_begin`` and ``on_test_end``,
``predict``, ``epoch_end`` after the last batch of an epoch, ``idle`` once ``fit`` returned) and custom loops
declare theirs with :func:`phase`; the stall alert waits much longer before it calls a paused process stalled.

The phase is a Python attribute set from Python code at phase boundaries: no TensorFlow op, nothing per step.
Nothing is exported until something sets a phase (a custom loop that never does counts as training).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from gradtel.metrics import PHASES

_lock = threading.Lock()
_current: str | None = None


def current() -> str | None:
    """The phase now, or None when nothing has declared one."""
    return _current


def set_phase(name: str) -> str | None:
    """Enter phase ``name`` (one of :data:`gradtel.metrics.PHASES`); returns the phase it replaces."""
    global _current
    if name not in PHASES:
        raise ValueError(f"gradtel phase must be one of {', '.join(PHASES)}, got {name!r}")
    with _lock:
        previous, _current = _current, name
    return previous


@contextmanager
def phase(name: str) -> Iterator[None]:
    """``with gradtel.phase("checkpoint"): save()``: the block is a pause, not a hang; the phase before it comes
    back afterwards (``train`` if there was none)."""
    previous = set_phase(name)
    try:
        yield
    finally:
        set_phase(previous or "train")
