"""Instrumenting optimizers: patch the instance's gradient funnel, measure, hand on unchanged.

Keras 3 routes every update (custom loops, ``model.fit``, ``LossScaleOptimizer``) through ``optimizer.apply``;
tf_keras through ``optimizer.apply_gradients``. gradtel replaces that method on the optimizer INSTANCE (never
the class, never a wrapper optimizer: checkpoint keys stay as they are) with a function that records the
gradients' statistics and calls the original. ``uninstrument`` deletes the instance attribute again, which
restores the class's method exactly.

The patch is read when a step is traced: functions traced before ``instrument`` keep the old method (see the
Keras callback, which forces a re-trace).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from gradtel import config, registry
from gradtel.handle import Handle
from gradtel.naming import PatternSet
from gradtel.registry import handles

__all__ = ["SUPPORTED", "handles", "instrument", "is_instrumented", "uninstrument", "uninstrument_all"]

log = logging.getLogger("gradtel")

SUPPORTED = (
    "a Keras 3 optimizer (keras.optimizers.Optimizer with the TensorFlow backend, LossScaleOptimizer included) "
    "or a tf_keras 2.x optimizer (tf_keras.optimizers.Optimizer or tf_keras.optimizers.legacy.Optimizer) "
    "or a tf.compat.v1.train optimizer"
)


def _flavour(optimizer: Any) -> str:
    """'keras3', 'tf_keras' or 'tf_v1', from the optimizer's class hierarchy; TypeError for anything else."""
    modules = [klass.__module__ for klass in type(optimizer).__mro__]
    if any(m.startswith("keras.") for m in modules) and hasattr(optimizer, "_filter_empty_gradients"):
        return "keras3"
    if any(m.startswith("tf_keras.") for m in modules) and hasattr(optimizer, "apply_gradients"):
        return "tf_keras"
    if "tensorflow.python.training.optimizer" in modules and hasattr(optimizer, "apply_gradients"):
        return "tf_v1"  # tf.compat.v1.train.*Optimizer: still in TF 2 programs ported from TF 1 (minimize included)
    raise TypeError(
        f"gradtel.instrument() expected {SUPPORTED}; got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
    )


def _unique_optimizer_name(requested: str | None, optimizer: Any) -> str:
    """The ``optimizer`` label: two live handles never share one (their series would collide)."""
    base = requested or str(getattr(optimizer, "name", None) or type(optimizer).__name__.lower())
    taken = {h.name for h in registry.handles(active_only=True)}
    if base not in taken:
        return base
    n = 2
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def _keras3_wrapper(optimizer: Any, original: Callable[..., Any], handle: Handle) -> Callable[..., Any]:
    @functools.wraps(original)
    def apply(grads: Iterable[Any], trainable_variables: Iterable[Any] | None = None) -> Any:
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        variables = trainable_variables
        if variables is None and getattr(optimizer, "built", False):
            variables = list(optimizer._trainable_variables)
        handle.observe(grads, variables)
        with handle.enriched_errors(grads, variables):
            return original(grads, trainable_variables)

    return apply


def _tf_keras_wrapper(optimizer: Any, original: Callable[..., Any], handle: Handle) -> Callable[..., Any]:
    @functools.wraps(original)
    def apply_gradients(grads_and_vars: Iterable[tuple[Any, Any]], *args: Any, **kwargs: Any) -> Any:
        pairs = list(grads_and_vars)  # may be a one-shot zip: consume it once, hand on the list
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        handle.observe(grads, variables)
        with handle.enriched_errors(grads, variables):
            return original(pairs, *args, **kwargs)

    return apply_gradients


def _reduce_wrapper(optimizer: Any, original: Callable[..., Any], handle: Handle) -> Callable[..., Any]:
    """Under a multi-replica strategy: measure the all-reduced gradients, the ones the optimizer applies."""

    @functools.wraps(original)
    def reduce(grads_and_vars: Iterable[tuple[Any, Any]], *args: Any, **kwargs: Any) -> Any:
        reduced = original(grads_and_vars, *args, **kwargs)
        pairs = list(reduced)
        handle.observe_reduced([g for g, _ in pairs], [v for _, v in pairs])
        return pairs

    return reduce


#: The method that funnels every update, per flavour.
_FUNNEL = {
    "keras3": ("apply", _keras3_wrapper),
    "tf_keras": ("apply_gradients", _tf_keras_wrapper),
    "tf_v1": ("apply_gradients", _tf_keras_wrapper),  # same (grads_and_vars, global_step=None, name=None) funnel
}
#: The method that all-reduces gradients across replicas (Keras 3; tf_keras; tf_keras legacy).
_REDUCERS = ("_all_reduce_sum_gradients", "aggregate_gradients", "_aggregate_gradients")


def _patch(handle: Handle, target: Any, method: str, wrapper: Callable[..., Any]) -> None:
    """Replace ``target.method`` on the instance, remembering how to undo it exactly."""
    from tensorflow.python.autograph.impl.api import do_not_convert

    had = method in vars(target)
    saved = vars(target).get(method)
    # AutoGraph converts what a converted step calls, unless its module is a library it knows (Keras is): gradtel's
    # wrapper is not, so without this its code (and the diagnosis under it) would be rewritten on every trace.
    patched = do_not_convert(wrapper(target, getattr(target, method), handle))
    object.__setattr__(target, method, patched)
    handle.patches.append((target, method, had, saved))


def _unpatch(handle: Handle) -> None:
    while handle.patches:
        target, method, had, saved = handle.patches.pop()
        if had:
            object.__setattr__(target, method, saved)
        else:
            object.__delattr__(target, method)


def _reducer(optimizer: Any) -> tuple[Any, str] | None:
    """The optimizer object that all-reduces (a loss-scale wrapper's inner one does) and its method name."""
    target = getattr(optimizer, "inner_optimizer", None) or optimizer
    for method in _REDUCERS:
        if callable(getattr(target, method, None)):
            return target, method
    return None


def instrument(
    optimizer: Any,
    *,
    name: str | None = None,
    expect_missing: Iterable[str] | str | None = None,
    max_abs: bool | None = None,
    meter_provider: Any = None,
    start_exporter: bool = True,
) -> Handle:
    """Measure every gradient ``optimizer`` applies, per variable and per step, inside the compiled step.

    Args:
        optimizer: a Keras 3 or tf_keras optimizer. Instrumenting twice returns the same handle.
        name: the ``optimizer`` label (default: the optimizer's name, made unique in the process). Name the
            optimizers of a GAN ("generator", "discriminator") to tell their series apart.
        expect_missing: glob patterns (or ``re:`` regexes) of variable paths meant to get no gradient
            (frozen backbones): reported as ``expected_missing``, not as faults, and ignored by the alerts.
        max_abs: also measure max |g| per variable each step (default: ``GRADTEL_MAX_ABS``, off). It costs
            about as much as the other statistics together on a model of many small layers.
        meter_provider: an OpenTelemetry ``MeterProvider`` to register gradtel's instruments on (library mode,
            as OpenTelemetry instrumentations take one): its readers, views and limits apply, and gradtel starts
            nothing (``start_exporter`` is not consulted). This optimizer's series go there only.
        start_exporter: without ``meter_provider``: True sets up the process's export, once: the application's
            global MeterProvider if it has set one (nothing is started), else gradtel's own from the
            environment (``OTEL_METRICS_EXPORTER``: the Prometheus endpoint by default). False starts nothing;
            the series go to the application's global MeterProvider if it has set one, else to gradtel's own
            export if something starts it later (``gradtel run``, another ``instrument``).

    Returns:
        The :class:`~gradtel.handle.Handle`: ``handle.records()`` reads the latest statistics.
    """
    flavour = _flavour(optimizer)
    patterns = PatternSet(expect_missing)  # a bad pattern is a ValueError naming it, before anything is changed
    with registry.lock:
        existing = registry.live(optimizer)
        if existing is not None:
            return existing
        if getattr(optimizer, "iterations", None) is not None and _iterations(optimizer) > 0:
            log.warning(
                "gradtel: optimizer %r has already taken steps; functions traced before instrumenting "
                "(a tf.function step, model.fit's train_function) keep running without gradtel until they are "
                "traced again. Use gradtel.keras.GradientTelemetry() with fit, or instrument before training.",
                getattr(optimizer, "name", optimizer),
            )
        process_diagnoser = registry.diagnoser()
        process_diagnoser.expect_optimizer()
        handle = Handle(
            name=_unique_optimizer_name(name, optimizer),
            flavour=flavour,
            expect_missing=patterns,
            loss_scale=_loss_scale_of(optimizer) if flavour == "keras3" else None,
            diagnoser=process_diagnoser,
            max_abs=config.max_abs_default() if max_abs is None else bool(max_abs),
        )
        method, wrapper = _FUNNEL[flavour]
        _patch(handle, optimizer, method, wrapper)
        reducer = _reducer(optimizer)
        if reducer is not None:
            _patch(handle, reducer[0], reducer[1], _reduce_wrapper)
        registry.add(optimizer, handle, meter_provider)
    from gradtel import export

    if meter_provider is not None:
        export.bind(meter_provider)
    elif start_exporter or export.global_provider_is_set():
        export.ensure_started()
    return handle


def uninstrument(optimizer: Any) -> None:
    """Restore ``optimizer`` exactly as it was; a no-op if it is not instrumented. Its counts stay reportable."""
    with registry.lock:
        handle = registry.remove(optimizer)
        if handle is not None:
            _unpatch(handle)


def is_instrumented(optimizer: Any) -> bool:
    return registry.live(optimizer) is not None


def _iterations(optimizer: Any) -> int:
    try:
        return int(optimizer.iterations.numpy())
    except Exception:  # not readable here (inside a trace, under a strategy): assume fresh
        return 0


def _loss_scale_of(optimizer: Any) -> Callable[[], Any] | None:
    """Keras 3 LossScaleOptimizer receives SCALED gradients: gradtel divides them by its current scale.

    The scale variable is created when the optimizer is built (by its first apply, after gradtel has seen the
    gradients), so look it up at trace time and use the initial scale before that, as Keras does; through a
    weak reference: gradtel keeps no optimizer alive.
    """
    if not hasattr(optimizer, "inner_optimizer"):
        return None
    ref = weakref.ref(optimizer)

    def scale() -> Any:
        lso = ref()
        if lso is None:
            return None
        return lso.dynamic_scale if getattr(lso, "built", False) else getattr(lso, "initial_scale", None)

    return scale


def uninstrument_all() -> None:
    """Undo everything gradtel patched: every instrumented optimizer, and the diagnoser's patches of
    ``tf.GradientTape``, tf.data's function tracer and eager tensors (a later ``instrument`` installs them again).
    The handles' counts stay reportable."""
    for optimizer in registry.live_optimizers():
        uninstrument(optimizer)
    registry.remove_diagnoser()
