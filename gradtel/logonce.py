"""Log a message once: gradtel runs inside every training step and every collection, so a failure or a warning
that can repeat must not flood the training log (one line, then silence, and training goes on).

A :class:`LogOnce` remembers the keys it has logged; its owner decides the scope: a handle, a reader or a
producer holds its own (once per object), and :data:`log_once` is the process's (once per process, for settings
and for module-level hooks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import Any


class LogOnce:
    """Logs each key once (thread-safe). The key defaults to the message's format string, so one call site logs
    once whatever its arguments; pass ``key`` to log once per value (a metric name, a settings line)."""

    __slots__ = ("_lock", "_said")

    def __init__(self) -> None:
        self._said: set[Hashable] = set()
        self._lock = threading.Lock()

    def __call__(
        self, logger: logging.Logger, level: int, msg: str, *args: Any, key: Hashable = None, exc_info: bool = False
    ) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` was logged before. Returns whether it logged."""
        key = msg if key is None else key
        with self._lock:
            if key in self._said:
                return False
            self._said.add(key)
        logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
        return True


#: The process's: settings problems and module-level hooks, logged once per process.
log_once = LogOnce()
