"""The process's instrumented optimizers and its diagnoser: what instrumenting writes and the exporters read.

Why a module of its own: instrumenting (which patches optimizers) and export (which reads their statistics at
collection time) both need the process's handles. Kept here, below both, each depends on it and neither on the
other, so the package has no import cycle (``tests/core/test_layers.py`` checks that).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradtel.diagnosis import Diagnoser
    from gradtel.handle import Handle

#: Uninstrumented handles kept for the report; older ones are forgotten, so a process that builds many
#: optimizers (a hyperparameter search) keeps bounded memory.
MAX_RETIRED_HANDLES = 32

#: Held while the registry changes (reentrant: instrumenting holds it across a whole instrument() call).
lock = threading.RLock()


@dataclass
class _Entry:
    handle: Handle
    #: The MeterProvider given to ``instrument(meter_provider=...)``, or None: the process's export.
    meter_provider: Any


_entries: list[_Entry] = []  # every handle in creation order (kept after uninstrument: its counts stay reportable)
_live: weakref.WeakKeyDictionary[Any, Handle] = weakref.WeakKeyDictionary()  # optimizer -> its live handle
_diagnoser: Diagnoser | None = None


def add(optimizer: Any, handle: Handle, meter_provider: Any = None) -> None:
    """Register ``handle`` as ``optimizer``'s live handle, exported through ``meter_provider`` (None: the process's
    export). An optimizer dropped without uninstrument retires its handle (it stops exporting)."""
    with lock:
        _live[optimizer] = handle
        _entries.append(_Entry(handle, meter_provider))
        weakref.finalize(optimizer, _retire, handle)
        _prune()


def live(optimizer: Any) -> Handle | None:
    """``optimizer``'s handle while it is instrumented, else None."""
    return _live.get(optimizer)


def live_optimizers() -> list[Any]:
    with lock:
        return list(_live.keys())


def remove(optimizer: Any) -> Handle | None:
    """Forget ``optimizer`` as instrumented and retire its handle (kept for the report); None if it was not."""
    with lock:
        handle = _live.pop(optimizer, None)
        if handle is not None:
            handle.active = False
        return handle


def handles(active_only: bool = False, meter_providers: Collection[Any] | None = None) -> list[Handle]:
    """The handles in creation order: instrumented now, and (unless ``active_only``) the latest retired ones, whose
    counts the report still includes; with ``meter_providers``, only those instrumented with one of them (None
    stands for the process's export)."""
    with lock:
        return [
            e.handle
            for e in _entries
            if (e.handle.active or not active_only)
            and (meter_providers is None or any(e.meter_provider is m for m in meter_providers))
        ]


def current_diagnoser() -> Diagnoser | None:
    """The Diagnoser if one was installed, else None (never installs one)."""
    return _diagnoser


def diagnoser() -> Diagnoser:
    """The process's Diagnoser, installed on first use (it patches tf.GradientTape, tf.data and eager tensors)."""
    global _diagnoser
    with lock:
        if _diagnoser is None:
            from gradtel.diagnosis import Diagnoser

            _diagnoser = Diagnoser()
            _diagnoser.install()
        return _diagnoser


def remove_diagnoser() -> None:
    """Undo every patch the diagnoser made and forget it; the next instrumented optimizer installs a new one."""
    global _diagnoser
    with lock:
        found, _diagnoser = _diagnoser, None
    if found is not None:
        found.uninstall()


def _retire(handle: Handle) -> None:
    handle.active = False


def _prune() -> None:
    retired = [e for e in _entries if not e.handle.active]
    for entry in retired[: max(0, len(retired) - MAX_RETIRED_HANDLES)]:
        _entries.remove(entry)
