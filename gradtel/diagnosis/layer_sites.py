"""Where the user created (or connected) each Keras layer: the line a cause names when the op that cuts the gradient
was made by a library layer run by a library model.

An op of a ``Dense`` inside a functional or Sequential model, traced by ``model.fit`` (or by ``model(x)``), has no
user frame of its own: the innermost user frame of its creation is the ``model.fit(...)`` line, the same for every
op of the model. The line that tells the user which layer is where they connected it (``x = dense(x)`` while
building a functional model) or, for a layer connected by a library (a Sequential model) or more than once (a
shared layer), where they wrote ``Dense(...)``. The Keras 3 and tf_keras layer base classes are wrapped, reversibly:
``__init__`` notes the innermost user frame as each layer is created (a layer created inside another library layer,
an LSTM's cell, gets its creator's line), the symbolic call that builds a functional model notes where the user
called it. An op is matched to its layer by the live stack in eager mode (the ``self`` of the innermost
``Layer.__call__``) and by its name scope in graph mode (Keras 3 adds a ``_N`` suffix to each layer's scope inside a
traced function, tf_keras does not). Only layers created after ``install`` are known: under ``gradtel run`` it is
installed as Keras is imported.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NamedTuple

from gradtel.diagnosis.frames import is_library_file, location_of_stack

#: The Keras layer base classes: (module, class, its symbolic-call method, whether scopes in a traced function carry
#: a ``_N`` suffix).
_BASES = (
    ("keras.src.layers.layer", "Layer", "symbolic_call", True),
    ("tf_keras.src.engine.base_layer", "Layer", "_functional_construction_call", False),
)
_SUFFIX = re.compile(r"_\d+$")


@dataclass
class _Site:
    layer: weakref.ref
    created: str
    keras3: bool  # a Keras 3 layer (else tf_keras): the two frameworks count their default names apart
    connected: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        """Where the user connected the layer, if once; else where they created it."""
        return next(iter(self.connected)) if len(self.connected) == 1 else self.created


_lock = threading.Lock()
_users = 0  # installs not yet matched by an uninstall
_patched: list[tuple[type, str, Any]] = []
#: layer name -> its layers' sites, the newest last; dead layers are pruned as names recur, and names whose layers
#: are all dead whenever the table doubles (from _PRUNE_FLOOR names): bounded by the live layers
_sites: dict[str, list[_Site]] = {}
_PRUNE_FLOOR = 1024
_prune_at = _PRUNE_FLOOR
#: code objects of the base classes' ``__call__`` (a frame running one is a layer being called), by base
_calls: dict[Any, bool] = {}


def install() -> None:
    """Wrap ``__init__`` and the symbolic call of each Keras layer base class already imported; each call is matched
    by one ``uninstall`` (a process may hold several diagnosers: the last one out unwraps)."""
    global _users
    with _lock:
        _users += 1
        _wrap_imported()


def refresh() -> None:
    """Wrap a layer base class imported since ``install`` (the post-import hook of ``gradtel run`` calls this)."""
    with _lock:
        if _users:
            _wrap_imported()


def _wrap_imported() -> None:
    for module_name, class_name, symbolic, suffixed in _BASES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if not isinstance(cls, type) or "__init__" not in cls.__dict__ or any(c is cls for c, _, _ in _patched):
            continue
        call = cls.__dict__.get("__call__")
        code = getattr(inspect.unwrap(call), "__code__", None) if call is not None else None  # under Keras's filter
        if code is not None:
            _calls[code] = suffixed
        _wrap(cls, "__init__", functools.partial(_note_created, keras3=suffixed))
        # Keras 3.15 defines symbolic_call on Layer, Keras 3.8 on its base Operation (then ops pass through it too)
        owner = next((base for base in cls.__mro__ if symbolic in base.__dict__), None)
        if owner is not None and not any(c is owner and n == symbolic for c, n, _ in _patched):
            _wrap(owner, symbolic, _note_connected)


def uninstall() -> None:
    """Once every ``install`` is matched: restore the wrapped methods and forget every site."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return
        while _patched:
            cls, name, original = _patched.pop()
            setattr(cls, name, original)
        _calls.clear()
        _sites.clear()


def _wrap(cls: type, name: str, note: Any) -> None:
    original = cls.__dict__[name]

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        with contextlib.suppress(Exception):
            note(self)
        return result

    # Keras reads a layer's constructor arguments with inspect.getfullargspec, which does not follow __wrapped__
    wrapper.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)
    _patched.append((cls, name, original))


def _note_created(layer: Any, keras3: bool) -> None:
    where = location_of_stack(3)
    name = getattr(layer, "name", None)
    if where is None or not isinstance(name, str):
        return
    global _prune_at
    with _lock:
        alive = [site for site in _sites.get(name, ()) if site.layer() is not None]
        alive.append(_Site(weakref.ref(layer), where, keras3))
        _sites[name] = alive
        if len(_sites) > _prune_at:  # names that never recur (models built again and again): drop the dead ones
            for key in [k for k, sites in _sites.items() if all(site.layer() is None for site in sites)]:
                del _sites[key]
            _prune_at = max(_PRUNE_FLOOR, 2 * len(_sites))


def _note_connected(layer: Any) -> None:
    """A symbolic call: noted only when the user called the layer, the frame above its ``__call__`` (and Keras's
    traceback filter) being the user's (a Sequential model connecting its layers is not the user's line)."""
    site = _site(layer)
    if site is None:  # not a layer noted here (an op, in Keras 3.8)
        return
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code not in _calls:
        frame = frame.f_back
    frame = frame.f_back if frame is not None else None
    while frame is not None and frame.f_code.co_name == "error_handler" and is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is not None and not is_library_file(frame.f_code.co_filename):
        site.connected.add(f"{frame.f_code.co_filename}:{frame.f_lineno}")


def _site(layer: Any) -> _Site | None:
    for site in _sites.get(getattr(layer, "name", None) or "", ()):
        if site.layer() is layer:
            return site
    return None


class LayerSite(NamedTuple):
    """Where the library layer that made an op was connected or created, and whether a library (``fit``, a
    Keras trainer) rather than the user's own call ran the model: then the user's frame says nothing of the op."""

    line: str
    by_library: bool


def stack_locations(skip: int = 1) -> tuple[str | None, LayerSite | None]:
    """The innermost user frame of the current stack as ``file:line``, and, when a library layer run by a library
    model is making the op (two layer calls or more before that frame), its ``LayerSite`` (else None)."""
    frame: FrameType | None = sys._getframe(skip)
    calls, layer, called = 0, None, False
    while frame is not None:
        code = frame.f_code
        if code in _calls:
            calls, called = calls + 1, True
            layer = frame.f_locals.get("self") if layer is None else layer
        elif not is_library_file(code.co_filename):
            line = site_of_layer(layer) if calls >= 2 else None
            return f"{code.co_filename}:{frame.f_lineno}", LayerSite(line, not called) if line else None
        elif not _transparent(code.co_filename, code.co_name):
            called = False
        frame = frame.f_back
    return None, None


def op_site(op: Any) -> LayerSite | None:
    """For a traced op made by a library layer run by a library model: its ``LayerSite``, the layer found by the
    op's name scope; else None."""
    try:
        calls, suffixed, called = 0, False, False
        for frame in reversed(list(op.traceback)):
            kind = _call_kind(frame.filename, frame.name)
            if kind is not None:
                suffixed = kind if calls == 0 else suffixed
                calls, called = calls + 1, True
            elif not is_library_file(frame.filename):
                line = site_of_scope(op.name, suffixed) if calls >= 2 else None
                return LayerSite(line, not called) if line else None
            elif not _transparent(frame.filename, frame.name):
                called = False
    except Exception:
        return None
    return None


def _transparent(filename: str, function: str) -> bool:
    """A library frame between a user's call and the layer it called: Keras's traceback filter, AutoGraph's
    call machinery (a model called inside a tf.function)."""
    return function == "error_handler" or f"{os.sep}autograph{os.sep}" in filename


def site_of_layer(layer: Any) -> str | None:
    """Where this layer was connected or created (None if not noted)."""
    site = _site(layer)
    return None if site is None else site.where


def site_of_scope(op_name: str, suffixed: bool) -> str | None:
    """Where the layer an op belongs to was created, from the op's name (``model_1/dense_1/MatMul``): the innermost
    scope that names layers of the op's framework (``suffixed``: Keras 3), the live ones if any, if they all sit on
    one line; else None."""
    for scope in reversed(op_name.split("/")[:-1]):
        name = _SUFFIX.sub("", scope) if suffixed else scope
        named = [site for site in _sites.get(name, ()) if site.keras3 == suffixed]
        alive = [site for site in named if site.layer() is not None]
        sites = {site.where for site in alive or named}  # a trace's hints may be asked after its model is gone
        if sites:
            return sites.pop() if len(sites) == 1 else None
    return None


def _call_kind(filename: str, function: str) -> bool | None:
    """For a traceback frame: None if it is not a layer base class's ``__call__``, else whether that base's scopes
    carry a suffix in traced functions."""
    for code, suffixed in _calls.items():
        if code.co_name == function and code.co_filename == filename:
            return suffixed
    return None
