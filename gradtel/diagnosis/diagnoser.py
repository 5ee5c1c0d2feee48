"""The Diagnoser: installs the hooks, picks the facts for an optimizer step and asks the walker.

Graph mode (tf.function, model.fit, jit_compile): ``diagnose`` runs at trace time inside the FuncGraph, so the
whole step graph is there to walk. Eager mode: the eager tape cannot be inspected afterwards, so the recorder
must be armed BEFORE a step runs. It is armed while something waits for a recorded step: an instrumented
optimizer that has not stepped yet (its first step may be its only one: Keras raises when every gradient is
None), or a new set of missing gradients met in an unrecorded step (the same optimizer's next step is recorded,
however many steps of other optimizers come in between: a GAN, an actor-critic). A step with a known set returns
the cached diagnosis at the cost of one pass over the gradient list. Waiting is bounded: after
``_RECORDING_BUDGET`` diagnosed steps without the awaited one, the recorder gives up and is disarmed, so an
optimizer that never steps (model.compile()'s default in a custom train_step) cannot keep every eager op recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import tensorflow as tf
from tensorflow.python.autograph.impl import api as autograph
from tensorflow.python.eager import context
from tensorflow.python.framework import ops

from gradtel.diagnosis import graph_source, layer_sites
from gradtel.diagnosis.cause import UNKNOWN, Cause, Diagnosis, ReluCheck, make_cause
from gradtel.diagnosis.classify import Analysis, explain_missing, influences_loss, relu_witnesses, zero_hint
from gradtel.diagnosis.eager_recorder import EagerRecorder
from gradtel.diagnosis.pipeline_hook import PipelineHook
from gradtel.diagnosis.tape_hook import GradientCall, TapeHook
from gradtel.diagnosis.variables import dtype_of, handle, identity, is_trainable, underlying
from gradtel.naming import variable_path

_CACHE_SIZE = 64
#: Diagnosed steps (any optimizer) the recorder stays armed for while it waits for a first or pending step.
_RECORDING_BUDGET = 64
_Key = tuple[tuple[int, ...], tuple[int, ...]]


class Diagnoser:
    """One per process. Explains None gradients (and hints at zero ones) for the optimizer wrapper."""

    def __init__(self, max_recorded_ops: int = 100_000) -> None:
        self._recorder = EagerRecorder(max_recorded_ops)
        self._tapes = TapeHook(
            self._recorder.clock, self._recorder.paused, self._recorder.note_gradient, lambda: self._recorder.armed
        )
        self._pipeline = PipelineHook()
        self._eager_cache: OrderedDict[_Key, Diagnosis] = OrderedDict()
        self._graph_cache: weakref.WeakKeyDictionary[Any, dict[_Key, Diagnosis]] = weakref.WeakKeyDictionary()
        self._step_start = 0
        self._step_recorded = False
        # What keeps the recorder armed: optimizers announced but not yet stepped, missing sets whose next step
        # must be recorded, and how many more diagnosed steps the recorder waits for them.
        self._awaiting = 0
        self._pending: set[_Key] = set()
        self._budget = 0
        self._lists: set[int] = set()  # hashes of the variable lists seen (an optimizer's first step)
        #: healthy traces whose loss-influencing variables are worked out when the report asks (the newest kept)
        self._pending_influencers: deque[Callable[[], None]] = deque(maxlen=_CACHE_SIZE)
        self._influencers: dict[int, tuple[weakref.ref, str]] = {}
        # Every variable ever handed to an instrumented optimizer, alive: an optimizer long gone (its handle
        # retired and dropped) still trained its variables, which are then not "not optimized".
        self._optimized: dict[int, weakref.ref] = {}
        self._installed = False
        self._layer_sites = False  # holds one install of layer_sites

    # -- lifecycle -------------------------------------------------------------------------------------

    def install(self) -> None:
        """Patch tf.GradientTape and the eager recorder's hooks, and record the first step."""
        if self._installed:
            return
        try:
            self._tapes.install()
            self._pipeline.install()
            self._recorder.install()
            layer_sites.install()
            self._layer_sites = True
            self._installed = True
            self._arm()
        except Exception:
            self.uninstall()

    def expect_optimizer(self) -> None:
        """A new optimizer was instrumented: record until its first step, wherever other optimizers stand."""
        self._awaiting += 1
        self._budget = _RECORDING_BUDGET
        if self._installed and not self._recorder.armed:
            with contextlib.suppress(Exception):
                self._arm()

    def _arm(self) -> None:
        self._recorder.arm()
        self._budget = max(self._budget, _RECORDING_BUDGET)
        self._step_start, self._step_recorded = self._recorder.clock(), True

    def uninstall(self) -> None:
        """Remove every patch and forget what was recorded."""
        with contextlib.suppress(Exception):
            self._tapes.uninstall()
        with contextlib.suppress(Exception):
            self._pipeline.uninstall()
        with contextlib.suppress(Exception):
            self._recorder.uninstall()
        if self._layer_sites:
            with contextlib.suppress(Exception):
                layer_sites.uninstall()
            self._layer_sites = False
        self._eager_cache.clear()
        self._graph_cache = weakref.WeakKeyDictionary()
        self._pending.clear()
        self._awaiting = 0
        self._installed = False

    @property
    def recording(self) -> bool:
        """Whether eager ops are being recorded right now."""
        return self._recorder.armed

    # -- diagnosis -------------------------------------------------------------------------------------

    @autograph.do_not_convert
    def diagnose(self, grads: list, variables: list) -> Diagnosis:
        """Causes for the None entries of ``grads`` (and zero hints for the others); never raises.

        Called while a step is traced, maybe from AutoGraph-converted code: gradtel's own code must run as written,
        not rewritten by AutoGraph (the optimizer wrappers are marked the same way)."""
        try:
            with self._recorder.paused():
                lists = hash(tuple(id(v) for v in variables))
                if lists not in self._lists:
                    self._lists.add(lists)
                    self._awaiting = max(0, self._awaiting - 1)
                if context.executing_eagerly():
                    return self._diagnose_eager(grads, variables)
                return self._diagnose_graph(grads, variables)
        except Exception as error:
            return _failed(grads, error)

    def _diagnose_graph(self, grads: list, variables: list) -> Diagnosis:
        # Steps run as graphs are diagnosed at trace time: the recorder only matters for eager steps. Optimizers
        # not stepped yet most likely step as graphs too, and left armed for them the recorder would slow every
        # eager op of the process (evaluation, data code) for nothing; a pending eager set still keeps it.
        self._awaiting = 0
        self._settle()
        graph = ops.get_default_graph()
        key = _key(grads, variables)
        cached = self._graph_cache.setdefault(graph, {})
        if key not in cached:
            cached[key] = self._full(grads, variables, graph, step_start=-1)
        return cached[key]

    def _diagnose_eager(self, grads: list, variables: list) -> Diagnosis:
        key = _key(grads, variables)
        result = self._eager_cache.get(key)
        if result is None and self._step_recorded and self._recorder.armed:
            result = self._full(grads, variables, None, self._step_start)
            self._remember(key, result)
        if result is None:
            result = _pending(grads, variables)
            self._pending.add(key)
            self._budget = max(self._budget, _RECORDING_BUDGET)
        else:
            self._pending.discard(key)
        self._settle()
        return result

    def _settle(self) -> None:
        """Arm the recorder while a step is awaited (within the budget), disarm it otherwise; start a new step."""
        waiting = self._awaiting > 0 or bool(self._pending)
        if waiting:
            self._budget -= 1
            if self._budget <= 0:
                self._awaiting, waiting = 0, False
                self._pending.clear()
        if waiting and not self._recorder.armed:
            self._recorder.arm()
        elif not waiting and self._recorder.armed:
            self._recorder.disarm()
        self._step_start, self._step_recorded = self._recorder.clock(), self._recorder.armed

    def _remember(self, key: _Key, result: Diagnosis) -> None:
        self._eager_cache[key] = result
        while len(self._eager_cache) > _CACHE_SIZE:
            self._eager_cache.popitem(last=False)

    def _full(self, grads: list, variables: list, graph: Any, step_start: int) -> Diagnosis:
        """Walk the step's dataflow graph for every variable (the missing ones and the zero hints)."""
        self._note_optimized(variables)
        call = _best_call(self._tapes, graph, variables, grads)
        result = Diagnosis()
        analysis, call_graph = None, None
        keys_of: Any = _eager_keys
        if call is not None:
            call_graph = call.graph() if call.graph is not None else None
            if call_graph is not None:
                keys_of = graph_source.VariableKeys(call_graph)
                if all(g is not None for g in grads):
                    return self._deferred(grads, variables, call, call_graph, keys_of)
            if call.graph is None:
                flow = self._recorder.graph
            elif call_graph is not None:
                flow = graph_source.build(call_graph)
            else:
                flow = None
            if flow is not None:
                analysis = Analysis(
                    flow,
                    call,
                    _eager_step_start(step_start, call) if call.graph is None else -1,
                    read_in_pipeline=self._pipeline.read_in_pipeline,
                    function_graph=self._recorder.function_graph,
                )
                if call_graph is not None:
                    analysis.earlier = self._recorder.graph
                    analysis.captured = graph_source.captured_values(call_graph)
                analysis.trainable_keys = {
                    k for v in (*variables, *call.watched) if is_trainable(v) for k in _keys(v, keys_of)
                }
        hinted: list[tuple[int, set[int]]] = []
        for index, (grad, variable) in enumerate(zip(grads, variables, strict=False)):
            try:
                if grad is None:
                    name = variable_path(variable)
                    cause = _cheap(variable, name) or _walked(analysis, variable, name, keys_of)
                    result.causes[index] = cause
                elif analysis is not None:
                    keys = _keys(variable, keys_of)
                    hinted.append((index, keys))
                    hint = zero_hint(analysis, keys, variable_path(variable), _is_float16(grad, variable))
                    if hint is not None:
                        result.zero_hints[index] = hint
            except Exception as error:
                if grad is None:
                    result.causes[index] = make_cause(
                        UNKNOWN, f"Diagnosing `{variable_path(variable)}` failed ({error!r})"
                    )
        if analysis is not None:
            if call_graph is None:  # eager: the recording is bounded, and it moves on after this step
                with contextlib.suppress(Exception):  # without witnesses every hint stands
                    result.witnesses = relu_witnesses(analysis, hinted, result.zero_hints)
            elif result.zero_hints and call is not None:  # a trace: walked if a gradient turns out zero (resolve)
                result.resolve = _later_witnesses(_later_analysis(call_graph, call), hinted, dict(result.zero_hints))
            self._note_influencers(analysis, keys_of)
        return result

    def _note_influencers(self, analysis: Analysis, keys_of: Any) -> None:
        for variable in analysis.call.watched:
            if not is_trainable(variable) or not graph_source.carries_gradient(dtype_of(variable)):
                continue
            with contextlib.suppress(Exception):
                if influences_loss(analysis, _keys(variable, keys_of)):
                    inner = underlying(variable)
                    self._influencers[id(inner)] = (weakref.ref(inner), variable_path(variable))

    def _deferred(self, grads: list, variables: list, call: GradientCall, call_graph: Any, keys_of: Any) -> Diagnosis:
        """A traced step with every gradient present needs no walk now: its zero hints are worked out if a gradient
        turns out zero, and which watched variables fed its loss when the report asks (``not_optimized``). Only
        what those need is kept: the graph weakly, each variable's tensor ids, name and dtype flag, the watched
        variables weakly. Start-up then pays nothing per variable for the diagnosis of a healthy model."""
        analysis = _later_analysis(call_graph, call)
        hinted = [
            (i, _keys(v, keys_of), variable_path(v), _is_float16(g, v))
            for i, (g, v) in enumerate(zip(grads, variables, strict=False))
        ]
        watched = [
            (weakref.ref(underlying(v)), variable_path(v), _keys(v, keys_of))
            for v in call.watched
            if is_trainable(v) and graph_source.carries_gradient(dtype_of(v))
        ]

        def hints() -> tuple[dict[int, Cause], dict[int, ReluCheck]]:
            found = analysis()
            if found is None:
                return {}, {}
            zero = {i: h for i, keys, name, half in hinted if (h := zero_hint(found, keys, name, half)) is not None}
            return zero, relu_witnesses(found, [(i, keys) for i, keys, _, _ in hinted], zero)

        def influencers() -> None:
            found = analysis()
            if found is None:
                return
            for ref, name, keys in watched:
                inner = ref()
                if inner is not None and influences_loss(found, keys):
                    self._influencers[id(inner)] = (ref, name)

        self._pending_influencers.append(influencers)
        return Diagnosis(resolve=hints)

    def _note_optimized(self, variables: list) -> None:
        # Once per new (trace, variable list), like the walk that follows: dropping the dead entries here keeps
        # the table bounded by the live variables.
        self._optimized = {k: r for k, r in self._optimized.items() if r() is not None}
        for variable in variables:
            with contextlib.suppress(TypeError):  # not weak-referenceable: the handles' lists still name it
                inner = underlying(variable)
                self._optimized[id(inner)] = weakref.ref(inner)

    def not_optimized(self, optimized: Iterable[Any]) -> list[tuple[str, bool]]:
        """(name, tracked) of each trainable variable that fed the loss inside a recorded tape but never went to an
        optimizer, sorted by name. ``tracked`` is False for a plain ``tf.Variable`` held by a Keras 3 layer without
        a Keras variable around it: Keras 3 does not track it, so it cannot reach an optimizer through
        ``model.trainable_variables``, a bug. Any other (a Keras variable of a frozen feature extractor or of a
        target network updated by assign, a variable of a tf_keras layer or a tf.Module, one the script holds
        itself) was left out by the program's choice. A frozen layer's variables (``layer.trainable = False``, in
        Keras 3 or tf_keras) are not listed: the tape still watches their tf.Variables, which stay trainable, but
        the program said the exclusion is intended."""
        try:
            while self._pending_influencers:
                with contextlib.suppress(Exception):
                    self._pending_influencers.popleft()()
            given = {identity(v) for v in optimized}
            given.update(k for k, ref in list(self._optimized.items()) if ref() is not None)
            found = [(ref(), name) for key, (ref, name) in list(self._influencers.items()) if key not in given]
            found = [(variable, name) for variable, name in found if variable is not None]
            untracked, frozen = _keras_standing([variable for variable, _ in found])
            return sorted(
                (name, id(variable) not in untracked) for variable, name in found if id(variable) not in frozen
            )
        except Exception:
            return []


def _keras_standing(variables: list) -> tuple[set[int], set[int]]:
    """(untracked, frozen): ids of those plain tf.Variables that a Keras 3 layer holds (as an attribute, or in a
    list, dict or set attribute, which Keras 3 turns into its tracked containers), directly or through a
    ``tf.Module`` it holds, while no Keras 3 variable wraps them; and ids of those that a frozen layer holds
    (``_frozen``).

    Keras keeps no link from a tf.Variable back to its holders, so the heap is asked, at report time, for the
    candidates only (one walk of the garbage collector's objects: 20 to 90 ms for a Keras process's 280,000; two
    more when a candidate sits in a ``tf.Module``, whose holder is asked for in turn).
    A referrer is a Keras 3 variable (its ``__dict__`` holds ``_path`` and, as ``_value``, the tf.Variable), a
    Keras 3 layer (a ``Tracker`` as ``_tracker``; Python 3.11 hands out the object or its ``__dict__``), a tracked
    container, a ``tf.Module`` (Keras 3 tracks none: its variables are not the layer's), or anything else
    (ignored). Without Keras 3 loaded nothing is untracked: tf_keras and tf.Module track plain tf.Variables
    themselves."""
    import gc
    import sys

    if not variables:
        return set(), set()
    candidates = {id(v) for v in variables}
    holders = gc.get_referrers(*variables)
    frozen = _frozen(holders) & candidates
    tracking = sys.modules.get("keras.src.utils.tracking")
    if tracking is None:
        return set(), frozen
    # TrackedOrderedDict is Keras 3.14's; older Keras 3 releases have the others only.
    containers = tuple(
        getattr(tracking, name)
        for name in ("TrackedList", "TrackedDict", "TrackedOrderedDict", "TrackedSet")
        if hasattr(tracking, name)
    )

    def in_keras3(holders: list) -> tuple[set[int], set[int], list]:
        """(ids held by a Keras 3 layer or container, ids a Keras 3 variable wraps, the other attribute dicts)."""
        held: set[int] = set()
        wrapped: set[int] = set()
        others: list = []
        for holder in holders:
            with contextlib.suppress(Exception):  # an odd referrer (a property raising on __dict__) is not a holder
                if isinstance(holder, containers):
                    held.update(map(id, holder.values() if isinstance(holder, dict) else holder))
                    continue
                attributes = _attributes(holder)
                if attributes is None:
                    continue
                if "_path" in attributes and "_value" in attributes:
                    wrapped.add(id(attributes["_value"]))
                elif isinstance(attributes.get("_tracker"), tracking.Tracker):
                    held.update(map(id, attributes.values()))
                else:
                    others.append(holder)
        return held, wrapped, others

    held, wrapped, others = in_keras3(holders)
    modules = _modules_holding(others, candidates - held)
    if modules:
        layer_held, _, _ = in_keras3(gc.get_referrers(*modules))
        for module in modules:
            if id(module) in layer_held:
                held.update(map(id, vars(module).values()))
    return (held - wrapped) & candidates, frozen


def _frozen(holders: list) -> set[int]:
    """ids of the variables that a frozen layer holds: the tf.Variable inside a Keras 3 variable set
    ``trainable=False`` (``layer.trainable = False`` sets it; the tf.Variable stays trainable), or an attribute of
    a tf_keras layer set ``trainable = False`` (its variables stay trainable too)."""
    frozen: set[int] = set()
    for holder in holders:
        with contextlib.suppress(Exception):
            attributes = _attributes(holder)
            if attributes is None or attributes.get("_trainable") is not False:
                continue
            if "_path" in attributes and "_value" in attributes:
                frozen.add(id(attributes["_value"]))
            elif "_trainable_weights" in attributes:  # a tf_keras layer's
                frozen.update(map(id, attributes.values()))
    return frozen


def _attributes(holder: Any) -> dict | None:
    """A referrer's attribute dict: Python 3.11 hands out an object or its ``__dict__``."""
    attributes = holder if type(holder) is dict else getattr(holder, "__dict__", None)
    return attributes if isinstance(attributes, dict) else None


def _modules_holding(holders: list, candidates: set[int]) -> list:
    """The tf.Modules among ``holders`` (objects, or their ``__dict__``) that hold one of ``candidates``."""
    import gc

    def holds(attributes: dict) -> bool:
        return any(id(value) in candidates for value in attributes.values())

    modules = [h for h in holders if isinstance(h, tf.Module) and holds(vars(h))]
    dicts = [h for h in holders if type(h) is dict and holds(h)]
    if dicts:
        owners = gc.get_referrers(*dicts)
        modules += [o for o in owners if isinstance(o, tf.Module) and any(vars(o) is d for d in dicts)]
    return modules


def _key(grads: list, variables: list) -> _Key:
    return tuple(id(v) for v in variables), tuple(i for i, g in enumerate(grads) if g is None)


def _keys(variable: Any, keys_of: Callable[[Any], set[int]]) -> set[int]:
    """The tensor ids of the variable's handle in the dataflow graph (``keys_of``: a handle's ids there)."""
    resource = handle(variable)
    return set() if resource is None else keys_of(resource)


def _eager_keys(resource: Any) -> set[int]:
    """Eager mode: the recorder knows a handle by its own tensor id."""
    return {resource._id} if hasattr(resource, "_id") else set()


def _later_analysis(call_graph: Any, call: GradientCall) -> Callable[[], Analysis | None]:
    """The trace's analysis, built again when asked for (None once the graph is gone): what is kept meanwhile is
    the graph, weakly, and the gradient call without its watched variables."""
    graph_ref = weakref.ref(call_graph)
    light = dataclasses.replace(call, watched=())

    def analysis() -> Analysis | None:
        graph = graph_ref()
        return None if graph is None else Analysis(graph_source.build(graph), light)

    return analysis


def _later_witnesses(
    analysis: Callable[[], Analysis | None], hinted: list[tuple[int, set[int]]], hints: dict[int, Cause]
) -> Callable[[], tuple[dict[int, Cause], dict[int, ReluCheck]]]:
    """The hints as they are, and their witnesses worked out from the traced graph when first asked for (the walks
    are per ReLU, and most traces never see a zero gradient); none once the graph is gone."""

    def resolve() -> tuple[dict[int, Cause], dict[int, ReluCheck]]:
        found = analysis()
        return hints, {} if found is None else relu_witnesses(found, hinted, hints)

    return resolve


def _eager_step_start(step_start: int, call: GradientCall) -> int:
    """Where this eager step's recording starts: after the previous optimizer step, or where the call's tape began
    recording if earlier (two optimizers stepped from one persistent tape: the second's forward pass ran before the
    first one stepped)."""
    return min([step_start, *(start for start, _ in call.intervals)])


def _best_call(tapes: TapeHook, graph: Any, variables: list, grads: list) -> GradientCall | None:
    """The gradient call these gradients came from: in this graph (or an outer one) when tracing, else eager
    calls, else calls made inside tf.functions. The one that returned these very gradients; else the one whose
    sources cover most of these variables, and of those the one that returned None for the same ones (two calls on
    one tape with the same sources, an actor's loss and a critic's); else the newest."""
    wanted = {identity(v) for v in variables}
    given = {id(g) for g in grads if g is not None}
    absent = {identity(v) for v, g in zip(variables, grads, strict=False) if g is None}

    def agreeing(call: GradientCall) -> int:
        missing = call.result.missing
        return -1 if missing is None else -len((missing ^ absent) & wanted & call.sources)

    candidates: list[GradientCall] = []
    current = graph
    while current is not None and not candidates:
        candidates = tapes.calls_for(current)
        current = getattr(current, "outer_graph", None)
    if graph is None:
        candidates = tapes.calls_for(None) or list(reversed(list(tapes.graph_calls())))
    if not candidates:
        return None
    return max(
        enumerate(candidates),
        key=lambda ic: (len(ic[1].result.gradients & given), len(ic[1].sources & wanted), agreeing(ic[1]), -ic[0]),
    )[1]


def _cheap(variable: Any, name: str) -> Cause | None:
    """Causes that need no graph: a non-floating dtype or trainable=False."""
    dtype = dtype_of(variable)
    if dtype is not None and not graph_source.carries_gradient(dtype):
        return make_cause("integer_dtype", f"`{name}` has dtype {tf.as_dtype(dtype).name}")
    if not is_trainable(variable):
        return make_cause("not_trainable", f"`{name}` has trainable=False")
    return None


def _walked(analysis: Analysis | None, variable: Any, name: str, keys_of: Any) -> Cause:
    if analysis is None:
        return make_cause(UNKNOWN, f"No GradientTape.gradient call was seen for `{name}`")
    return explain_missing(analysis, variable, _keys(variable, keys_of), name)


def _is_float16(grad: Any, variable: Any) -> bool:
    dtypes = {getattr(grad, "dtype", None), dtype_of(variable)}
    return tf.float16 in dtypes


def _pending(grads: list, variables: list) -> Diagnosis:
    """Eager: a new set of missing gradients in an unrecorded step; the next step is recorded."""
    causes = {}
    for index, (grad, variable) in enumerate(zip(grads, variables, strict=False)):
        if grad is None:
            name = variable_path(variable)
            causes[index] = _cheap(variable, name) or make_cause(
                UNKNOWN,
                f"`{name}` started missing its gradient in an unrecorded eager step; the next step "
                "is recorded and diagnosed",
            )
    return Diagnosis(causes)


def _failed(grads: list, error: Exception) -> Diagnosis:
    cause = make_cause(UNKNOWN, f"The diagnosis failed ({error!r})")
    return Diagnosis({i: cause for i, g in enumerate(grads) if g is None})
