"""Map a live stack or an op's creation traceback to the user's ``file:line``.

A cause is only actionable if it points at the user's code, so every frame that belongs to a library
(TensorFlow, Keras, tf_keras, gradtel itself, anything installed in site-packages, the Python standard
library, AutoGraph's generated files) is skipped.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from types import FrameType
from typing import Any

_GRADTEL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _library_roots() -> tuple[str, ...]:
    """Directories whose files are never the user's code."""
    roots = {_GRADTEL_DIR}
    # "scripts": console-script launchers (bin/gradtel, bin/opentelemetry-instrument) are nobody's culprit line.
    for key in ("stdlib", "platstdlib", "purelib", "platlib", "scripts"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path) + os.sep)
            roots.add(os.path.abspath(path) + os.sep)
    return tuple(sorted(roots))


_ROOTS = _library_roots()
_LIBRARY_PARTS = (
    f"{os.sep}site-packages{os.sep}",
    f"{os.sep}dist-packages{os.sep}",
    f"{os.sep}tensorflow{os.sep}python{os.sep}",
    f"{os.sep}keras{os.sep}src{os.sep}",
    f"{os.sep}tf_keras{os.sep}src{os.sep}",
)


@lru_cache(maxsize=8192)
def is_library_file(filename: str) -> bool:
    """Whether a frame in ``filename`` belongs to a library rather than to the user's program."""
    if filename.startswith("<"):
        return not filename.startswith(("<stdin>", "<ipython-input"))
    if "__autograph_generated_file" in filename:
        return True
    path = os.path.abspath(filename)
    if path.startswith(_ROOTS):
        return True
    return any(part in path for part in _LIBRARY_PARTS)


def location_of_stack(skip: int = 1) -> str | None:
    """The innermost user frame of the current stack, as ``file:line`` (``skip`` frames are ignored)."""
    frame: FrameType | None = sys._getframe(skip)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not is_library_file(filename):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def location_of_mapped_stack() -> str | None:
    """The innermost user frame of the current stack, AutoGraph's generated frames mapped back to the user's source
    (as in op tracebacks): code running inside a traced ``tf.function`` is in a generated file otherwise."""
    from tensorflow.python.util import tf_stack

    return location_of_traceback(tf_stack.extract_stack())


def location_of_traceback(frames: Iterable[Any]) -> str | None:
    """The innermost user frame of an op's creation traceback (outermost frame first)."""
    for frame in reversed(list(frames)):
        if not is_library_file(frame.filename):
            return f"{frame.filename}:{frame.lineno}"
    return None
