"""Remember what each ``tf.GradientTape`` recorded and differentiated.

Patched at class level (reversibly): ``_push_tape``/``_pop_tape`` mark the intervals during which a tape
recorded, measured on a clock shared with the op source (op ids in a FuncGraph, the eager recorder's op
counter in eager mode); ``gradient`` remembers its targets, sources and the tape's watched variables. That
is everything the walker needs to tell "read outside the tape" from "read inside but cut off".
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import backprop, context
from tensorflow.python.framework import ops

from gradtel.diagnosis.frames import location_of_mapped_stack
from gradtel.diagnosis.variables import identity, underlying

_MAX_CALLS = 8
_INTERVALS = "_gradtel_intervals"  # per hook: f"{_INTERVALS}_{id(hook)}"


@dataclass
class CallResult:
    """What one gradient call returned, noted once it returns: the sources whose gradient was None, and the ids of
    the gradients. Two calls on one tape with the same sources (A2C's actor and critic losses, a GAN's two) are
    told apart by them: an optimizer is given one call's gradients."""

    missing: frozenset[int] | None = None
    gradients: frozenset[int] = frozenset()


@dataclass(frozen=True)
class GradientCall:
    """One ``tape.gradient`` call: what was differentiated, against what, when the tape recorded, what it
    returned."""

    targets: tuple[int, ...]
    sources: frozenset[int]
    watched: tuple[Any, ...]
    intervals: tuple[tuple[int, float], ...]
    graph: weakref.ref | None
    seq: int
    tape_location: str | None = None  # the user's line that opened the tape (``with tf.GradientTape(...)``)
    result: CallResult = field(default_factory=CallResult, compare=False)

    @cached_property
    def watched_ids(self) -> frozenset[int]:
        """Identities of the watched variables, computed once: ``watches`` is asked once per missing variable."""
        return frozenset(identity(v) for v in self.watched)

    def watches(self, variable: Any) -> bool:
        """Whether the tape watched this variable."""
        return identity(variable) in self.watched_ids


def _graph_clock(graph: Any) -> int:
    """The id of the newest op in ``graph`` (op ids grow with creation)."""
    operations = graph.get_operations()
    return int(operations[-1]._id) if operations else 0


class TapeHook:
    """Installs the GradientTape patches and keeps the most recent gradient calls per graph."""

    def __init__(
        self,
        eager_clock: Callable[[], int],
        eager_pause: Callable[[], Any],
        eager_note: Callable[[Any, Any, Any], None] = lambda target, sources, result: None,
        eager_recording: Callable[[], bool] = lambda: True,
    ) -> None:
        self._eager_clock = eager_clock
        self._eager_pause = eager_pause
        self._eager_note = eager_note  # an eager gradient call, as one op of the recording
        # Whether an eager call's result can be used: a step is diagnosed only while the recorder records, and noting
        # it flattens every gradient (O(variables) on each eager step otherwise)
        self._eager_recording = eager_recording
        self._originals: dict[str, Any] = {}
        # Each hook keeps its own intervals on the tape: two installed hooks (a process's diagnoser and another
        # one) must not close each other's.
        self._intervals = f"{_INTERVALS}_{id(self)}"
        self._eager_calls: deque[GradientCall] = deque(maxlen=_MAX_CALLS)
        self._graph_calls: weakref.WeakKeyDictionary[Any, deque[GradientCall]] = weakref.WeakKeyDictionary()

    def install(self) -> None:
        """Patch tf.GradientTape (idempotent)."""
        if self._originals:
            return
        tape_class = backprop.GradientTape
        names = ("_push_tape", "_pop_tape", "gradient")
        self._originals = {name: tape_class.__dict__[name] for name in names}
        hook = self
        push, pop, gradient = (self._originals[name] for name in names)

        def _push_tape(tape: Any) -> None:
            push(tape)
            with contextlib.suppress(Exception):
                hook._open_interval(tape)

        def _pop_tape(tape: Any) -> None:
            with contextlib.suppress(Exception):
                hook._close_interval(tape)
            pop(tape)

        def patched_gradient(tape: Any, target: Any, sources: Any, *args: Any, **kwargs: Any) -> Any:
            call = None
            with contextlib.suppress(Exception):
                call = hook._remember(tape, target, sources)
            eager = context.executing_eagerly()
            with hook._eager_pause() if eager else contextlib.nullcontext():
                result = gradient(tape, target, sources, *args, **kwargs)
            with contextlib.suppress(Exception):
                if call is not None and (not eager or hook._eager_recording()):
                    _note_result(call, sources, result)
                if eager:  # its backward ops are not recorded (paused): the call stands for them
                    hook._eager_note(target, sources, result)
            return result

        tape_class._push_tape = _push_tape
        tape_class._pop_tape = _pop_tape
        tape_class.gradient = patched_gradient

    def uninstall(self) -> None:
        """Restore tf.GradientTape."""
        for name, original in self._originals.items():
            setattr(backprop.GradientTape, name, original)
        self._originals = {}
        self._eager_calls.clear()
        self._graph_calls = weakref.WeakKeyDictionary()

    def _clock(self) -> tuple[Any, int]:
        if context.executing_eagerly():
            return None, self._eager_clock()
        graph = ops.get_default_graph()
        return graph, _graph_clock(graph)

    def _open_interval(self, tape: Any) -> None:
        graph, now = self._clock()
        where = location_of_mapped_stack()
        tape.__dict__.setdefault(self._intervals, []).append([_graph_ref(graph), now, float("inf"), where])

    def _close_interval(self, tape: Any) -> None:
        intervals = tape.__dict__.get(self._intervals)
        if intervals and intervals[-1][2] == float("inf"):
            intervals[-1][2] = self._clock()[1]

    def _remember(self, tape: Any, target: Any, sources: Any) -> GradientCall:
        graph, now = self._clock()
        graph_ref = _graph_ref(graph)
        mine = [interval for interval in tape.__dict__.get(self._intervals, ()) if interval[0] == graph_ref]
        intervals = tuple((start, end if end != float("inf") else now) for _, start, end, _ in mine)
        call = GradientCall(
            targets=tuple(key for key in map(_target_key, tf.nest.flatten(target)) if key is not None),
            sources=frozenset(identity(s) for s in tf.nest.flatten(sources)),
            watched=tuple(tape.watched_variables()),
            intervals=intervals,
            graph=graph_ref,
            seq=now,
            tape_location=mine[0][3] if mine else None,
        )
        if graph is None:
            self._eager_calls.append(call)
        else:
            self._graph_calls.setdefault(graph, deque(maxlen=_MAX_CALLS)).append(call)
        return call

    def calls_for(self, graph: Any) -> list[GradientCall]:
        """Gradient calls made in ``graph`` (None: eager), newest first."""
        calls = self._eager_calls if graph is None else self._graph_calls.get(graph)
        return list(reversed(calls)) if calls is not None else []

    def graph_calls(self) -> Iterator[GradientCall]:
        """Gradient calls made in any live FuncGraph."""
        for calls in list(self._graph_calls.values()):
            yield from calls


def _note_result(call: GradientCall, sources: Any, result: Any) -> None:
    """Keep which sources got None, and the gradients' ids (a structure like ``sources``)."""
    flat_sources, flat = tf.nest.flatten(sources), tf.nest.flatten(result, expand_composites=False)
    if len(flat) != len(flat_sources):
        return
    call.result.missing = frozenset(identity(s) for s, g in zip(flat_sources, flat, strict=True) if g is None)
    call.result.gradients = frozenset(id(g) for g in flat if g is not None)


def _target_key(target: Any) -> int | None:
    """A tensor's id; for a variable differentiated as the target (a loss wrapped in ``tf.Variable``), its handle's
    id, which the dataflow graph resolves to the variable's latest written value."""
    if isinstance(target, tf.Variable):
        target = getattr(underlying(target), "handle", None)
    return getattr(target, "_id", None)


def _graph_ref(graph: Any) -> weakref.ref | None:
    return None if graph is None else weakref.ref(graph)
