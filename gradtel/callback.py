"""What the Keras callbacks of :mod:`gradtel.keras` and :mod:`gradtel.tf_keras` share.

A callback cannot see gradients (it only gets ``logs``); it instruments optimizers when training begins and
forces ``fit`` to trace its step again, because a step traced before the patch would never call it.

Which optimizers: ``model.optimizer`` is not always the one that steps. A ``train_step`` with its own optimizers
(the GAN pattern: ``model.compile(d_optimizer, g_optimizer, ...)`` stores them as attributes after
``super().compile()``, which makes a default optimizer ``train_step`` never uses) steps those instead. Keras's
attribute tracker follows variables, layers and metrics, not optimizers, so the callback reads the model's
attributes itself: every optimizer held directly or one level down in a list or dict, plus ``model.optimizer``.

At the end of ``fit`` the callback compares each optimizer's step count with the one at the start:

- ``model.optimizer`` idle while another held optimizer stepped is the GAN pattern working as written: the
  callback logs it once at INFO and stops watching it (it is uninstrumented when the callback instrumented it),
  so no dead series is exported and ``handles`` lists the optimizers that train;
- any other optimizer idle while the model trained is suspicious (a ``train_step`` that forgets to step a
  sub-model, or steps an optimizer the model does not hold): an :class:`IdleOptimizerWarning` names it.

The hooks also set the process's phase (:mod:`gradtel.phases`), so that a long evaluation or the epoch-end work
of other callbacks (checkpointing) is a pause, not a stall: ``train`` from ``on_train_begin``/``on_epoch_begin``,
``epoch_end`` from the last batch of an epoch (so the callbacks after it, in whatever order, are covered) or
``on_epoch_end``, ``evaluate``/``predict`` between their begin and end hooks, ``idle`` once ``fit`` returned.
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypedDict

from gradtel import phases, registry
from gradtel.handle import Handle
from gradtel.instrumenting import instrument, is_instrumented, uninstrument
from gradtel.naming import PatternSet

log = logging.getLogger("gradtel")

#: The label of ``model.optimizer`` among several held optimizers.
COMPILED = "optimizer"


class _Options(TypedDict):
    """The keyword arguments of :func:`gradtel.instrument` the callback passes on for every optimizer."""

    expect_missing: Iterable[str] | str | None
    max_abs: bool | None
    meter_provider: Any
    start_exporter: bool


class IdleOptimizerWarning(UserWarning):
    """An optimizer the model holds took no step during ``fit``, though training ran."""


class _Watched:
    """One optimizer the callback watches: its handle, whether this callback instrumented it, steps at start."""

    def __init__(self, optimizer: Any, handle: Handle, owned: bool) -> None:
        self.optimizer = weakref.ref(optimizer)  # the callback keeps no optimizer alive
        self.handle = handle
        self.owned = owned
        self.steps_at_begin = 0


class TelemetryMixin:
    """``on_train_begin``: instrument the optimizers the model steps (once) and re-make the train function;
    ``on_train_end``: say which of them never stepped."""

    model: Any
    #: The optimizer classes the callback looks for among the model's attributes (set by each flavour).
    optimizer_types: ClassVar[tuple[type, ...]] = ()

    def __init__(
        self,
        *,
        name: str | None = None,
        expect_missing: Iterable[str] | str | None = None,
        max_abs: bool | None = None,
        meter_provider: Any = None,
        start_exporter: bool = True,
    ) -> None:
        """The arguments are those of :func:`gradtel.instrument`. With several optimizers, ``name`` prefixes
        each one's label (``"gan/d_optimizer"``); without it the attribute name is the label."""
        super().__init__()
        PatternSet(expect_missing)  # a bad pattern is a ValueError here, not when fit has started
        self._name = name
        self._options: _Options = {
            "expect_missing": expect_missing,
            "max_abs": max_abs,
            "meter_provider": meter_provider,
            "start_exporter": start_exporter,
        }
        self._watched: dict[str, _Watched] = {}
        self._batches = 0
        #: The phase an evaluation or prediction interrupted (restored by its end hook).
        self._paused_from: str | None = None
        #: ``model.optimizer`` objects found idle beside a stepping one: not instrumented again by a later fit.
        self._dropped: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def handles(self) -> dict[str, Handle]:
        """The watched optimizers' handles by label (attribute path, ``"optimizer"`` for ``model.optimizer``)."""
        return {label: watched.handle for label, watched in self._watched.items()}

    @property
    def handle(self) -> Handle | None:
        """The first watched handle: ``model.optimizer``'s when it is the only optimizer, else the first held
        one (``d_optimizer`` in a GAN). ``handles`` has them all."""
        return next((watched.handle for watched in self._watched.values()), None)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        held = self._held_optimizers()
        if not held:
            raise ValueError("GradientTelemetry needs a compiled model: call model.compile(optimizer=...) first")
        self._batches = 0
        phases.set_phase("train")
        retrace = False
        for label, optimizer in held.items():
            watched = self._watched.get(label)
            if watched is None or watched.optimizer() is not optimizer or not watched.handle.active:
                watched = self._watch(label, optimizer, several=len(held) > 1)
                self._watched[label] = watched
                retrace = True  # even if instrumented elsewhere: after a step traced earlier, it takes effect
            watched.steps_at_begin = watched.handle.summary().steps
        for label in set(self._watched) - set(held):
            del self._watched[label]
        if retrace:
            self.model.make_train_function(force=True)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batches += 1
        if batch + 1 == (getattr(self, "params", None) or {}).get("steps"):
            phases.set_phase("epoch_end")  # validation, checkpoints and other epoch-end callbacks follow

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        phases.set_phase("train")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        phases.set_phase("epoch_end")

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._paused_from = phases.set_phase("evaluate")

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        phases.set_phase(self._paused_from or "idle")

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._paused_from = phases.set_phase("predict")

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        phases.set_phase(self._paused_from or "idle")

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        phases.set_phase("idle")
        try:
            self._report_idle()
        except Exception:  # telemetry never fails the user's training
            log.debug("gradtel: could not check which optimizers stepped", exc_info=True)

    def _held_optimizers(self) -> dict[str, Any]:
        """label -> optimizer: those held as attributes (one level into lists and dicts), then
        ``model.optimizer``; each object once, a loss-scale wrapper's inner optimizer left to its wrapper."""
        found: dict[str, Any] = {}
        for label, optimizer in _attribute_optimizers(self.model, self.optimizer_types):
            if label != COMPILED and all(optimizer is not known for known in found.values()):
                found[label] = optimizer
        compiled = getattr(self.model, "optimizer", None)
        held_elsewhere = any(compiled is known for known in found.values())
        if compiled is not None and not held_elsewhere and not (found and compiled in self._dropped):
            found[COMPILED] = compiled
        inner = [getattr(optimizer, "inner_optimizer", None) for optimizer in found.values()]
        return {label: opt for label, opt in found.items() if all(opt is not i for i in inner)}

    def _watch(self, label: str, optimizer: Any, several: bool) -> _Watched:
        if is_instrumented(optimizer):
            return _Watched(optimizer, instrument(optimizer), owned=False)  # the existing handle, its name
        name = self._name
        if several:
            name = f"{self._name}/{label}" if self._name else label
        return _Watched(optimizer, instrument(optimizer, name=name, **self._options), owned=True)

    def _report_idle(self) -> None:
        if not self._batches:
            return  # no batch ran (epochs=0, an empty dataset): nothing should have stepped
        stepped: list[str] = []
        idle: list[str] = []
        for label, watched in self._watched.items():
            steps = watched.handle.summary().steps - watched.steps_at_begin
            (stepped if steps > 0 else idle).append(label)
        if stepped and COMPILED in idle:
            idle.remove(COMPILED)
            self._drop_compiled(stepped)
        if idle:
            warnings.warn(_idle_message(idle, stepped, self._watched), IdleOptimizerWarning, stacklevel=2)

    def _drop_compiled(self, stepped: list[str]) -> None:
        """``model.optimizer`` is unused beside the optimizers ``train_step`` steps: stop watching it."""
        watched = self._watched.pop(COMPILED)
        log.info(
            "gradtel: model.optimizer (%r, made by model.compile()) took no step during fit; train_step stepped %s. "
            "gradtel stops watching model.optimizer.",
            watched.handle.name,
            ", ".join(self._watched[label].handle.name for label in stepped),
        )
        optimizer = watched.optimizer()
        if optimizer is None:
            return
        self._dropped.add(optimizer)
        if watched.owned:
            uninstrument(optimizer)


def _attribute_optimizers(model: Any, types: tuple[type, ...]) -> Iterator[tuple[str, Any]]:
    """(label, optimizer) for each optimizer in the model's attributes, directly or in a list/tuple/dict: public
    attributes first, so an optimizer also held privately is labelled by its public name. TensorFlow's tracking
    bookkeeping (``_self_*``: dicts mirroring the attributes) is skipped."""
    attributes = [(a, v) for a, v in list(vars(model).items()) if not a.startswith("_self_")]
    attributes.sort(key=lambda item: item[0].startswith("_"))  # stable: public, then private, each in order
    for attribute, value in attributes:
        if isinstance(value, types):
            yield attribute, value
        elif isinstance(value, Mapping):
            yield from ((f"{attribute}[{key}]", v) for key, v in list(value.items()) if isinstance(v, types))
        elif isinstance(value, (list, tuple)):
            yield from ((f"{attribute}[{i}]", v) for i, v in enumerate(value) if isinstance(v, types))


def compiled_beside_stepping(optimizers: Iterable[Any]) -> list[Any]:
    """Of ``optimizers``, each that is a Keras model's ``model.optimizer`` while another optimizer the same model
    holds as an attribute has taken a step: the GAN pattern (``model.compile()`` made a default optimizer that the
    custom ``train_step`` never steps), for ``gradtel check``, which has no model at hand as this callback has.

    Keras keeps no registry of its models, so they are looked for among the garbage collector's objects: one pass
    (about 0.05 s with TensorFlow and Keras loaded), made once per check. ``type(obj)``, not ``isinstance``: a
    proxy's ``__class__`` may run code.
    """
    wanted = {id(optimizer) for optimizer in optimizers}
    classes = (getattr(sys.modules.get(name), "Model", None) for name in ("keras", "tf_keras"))
    model_types = tuple(cls for cls in classes if isinstance(cls, type))
    live = registry.live_optimizers()
    if not wanted or not model_types or not live:
        return []
    optimizer_types = tuple({type(optimizer) for optimizer in live})
    found: list[Any] = []
    for obj in gc.get_objects():
        if not issubclass(type(obj), model_types):
            continue
        compiled = vars(obj).get("optimizer")
        if id(compiled) not in wanted or any(compiled is known for known in found):
            continue
        held = (o for _, o in _attribute_optimizers(obj, optimizer_types) if o is not compiled)
        handles = (registry.live(o) for o in held)
        if any(h is not None and h.summary().steps > 0 for h in handles):
            found.append(compiled)
    return found


def _idle_message(idle: list[str], stepped: list[str], watched: Mapping[str, _Watched]) -> str:
    names = ", ".join(f"{label} ({watched[label].handle.name!r})" for label in idle)
    if stepped:
        return (
            f"gradtel: optimizer(s) {names} held by the model took no step during fit while "
            f"{', '.join(stepped)} did: the variables they should train are not being updated "
            "(does train_step apply their gradients?)"
        )
    return (
        f"gradtel: no optimizer the model holds took a step during fit ({names}): gradtel measured no "
        "gradient. If train_step steps an optimizer the model does not hold, hold it as a model attribute "
        "(self.my_optimizer = ...) or instrument it with gradtel.instrument() before fit."
    )
