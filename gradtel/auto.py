"""Zero-code instrumentation: every Keras 3 / tf_keras optimizer created in the process gets instrumented.

Used by ``gradtel run`` and by the OpenTelemetry instrumentor. Keras is NOT imported here: importing it early
would run before the script sets ``KERAS_BACKEND`` or ``TF_USE_LEGACY_KERAS``. Instead a post-import hook patches
the optimizer base classes' ``__init__`` when (and if) the script imports them. An optimizer is instrumented when
its outermost ``__init__`` returns; a loss-scale wrapper takes over from its inner optimizer, which is then
uninstrumented, so no step is counted twice.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from gradtel.logonce import log_once

log = logging.getLogger("gradtel")

#: module -> classes whose __init__ is wrapped (base classes, and loss-scale wrappers that may not call them).
TARGETS: dict[str, tuple[str, ...]] = {
    "keras.src.optimizers.base_optimizer": ("BaseOptimizer",),
    "keras.src.optimizers.loss_scale_optimizer": ("LossScaleOptimizer",),
    "tf_keras.src.optimizers.optimizer": ("_BaseOptimizer",),
    "tf_keras.src.optimizers.legacy.optimizer_v2": ("OptimizerV2",),
    "tf_keras.src.mixed_precision.loss_scale_optimizer": ("LossScaleOptimizer", "LossScaleOptimizerV3"),
    "tensorflow.python.training.optimizer": ("Optimizer",),
}

#: Modules whose import starts the diagnosis without a class to instrument: the Keras layer base classes, whose
#: ``__init__`` the diagnosis wraps to note where each layer is created (``diagnosis.layer_sites``).
LAYER_MODULES = ("keras.src.layers.layer", "tf_keras.src.engine.base_layer")

_lock = threading.RLock()
_depth = threading.local()
_options: dict[str, Any] = {}
_patched: list[tuple[type, Callable[..., None]]] = []
_finder: _PostImportFinder | None = None


def _after_init(optimizer: Any) -> None:
    from gradtel.instrumenting import instrument, uninstrument

    try:
        inner = getattr(optimizer, "inner_optimizer", None)
        if inner is not None:
            uninstrument(inner)
        instrument(optimizer, **_options)
    except Exception:
        log_once(
            log,
            logging.WARNING,
            "gradtel: could not instrument %s; it trains without gradtel.",
            type(optimizer).__name__,
            exc_info=True,
        )


def _wrap_init(cls: type) -> None:
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _depth.n -= 1
        if _depth.n == 0:
            _after_init(self)

    cls.__init__ = __init__  # type: ignore[misc]
    _patched.append((cls, original))


def _patch_module(module: ModuleType) -> None:
    with _lock:
        for name in TARGETS.get(module.__name__, ()):
            cls = getattr(module, name, None)
            if isinstance(cls, type) and "__init__" in cls.__dict__ and all(c is not cls for c, _ in _patched):
                _wrap_init(cls)
    if module.__name__.startswith(("keras.", "tf_keras.")):  # not tensorflow's own: it loads with every TF program
        _start_diagnosis()


def _start_diagnosis() -> None:
    """Install the diagnoser as Keras is imported, before the script builds its model.

    Its eager recorder then sees what the script computes before the first step (a kernel derived once in
    ``build()``, a forward pass before the tape), which is what names those causes and their lines. It records only
    until the first steps are diagnosed (graph steps at once). A failure here only costs the diagnosis.
    """
    try:
        from gradtel import registry
        from gradtel.diagnosis import layer_sites

        registry.diagnoser()
        layer_sites.refresh()  # a layer module loaded after the diagnoser was
    except Exception:
        log.debug("gradtel: the diagnoser could not be installed at import", exc_info=True)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the freshly executed module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            _patch_module(module)
        except Exception:
            log.warning(
                "gradtel: patching %s failed; optimizers train without gradtel.", module.__name__, exc_info=True
            )


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds TARGETS and LAYER_MODULES modules through the other finders and wraps their loader."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname not in TARGETS and fullname not in LAYER_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def enable(**options: Any) -> None:
    """Instrument every optimizer created from now on (and patch modules already imported)."""
    global _finder
    with _lock:
        _options.clear()
        _options.update(options)
        if _finder is None:
            _finder = _PostImportFinder()
            sys.meta_path.insert(0, _finder)
        for name in (*TARGETS, *LAYER_MODULES):
            if name in sys.modules:
                _patch_module(sys.modules[name])


def disable() -> None:
    """Stop instrumenting new optimizers and undo every patch: the optimizers' base classes, the optimizers
    instrumented, the diagnoser's."""
    global _finder
    from gradtel.instrumenting import uninstrument_all

    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None
        while _patched:
            cls, original = _patched.pop()
            cls.__init__ = original  # type: ignore[misc]
    uninstrument_all()
