"""Eager mode: record what ran, because the eager tape is C++ and cannot be inspected afterwards.

While armed, an op callback adds every eagerly executed op to a DataflowGraph (tensor ids, op type, dtype
flags, the user's file:line); ``.numpy()``/``__array__`` note tensors that left TensorFlow; and
``record.record_operation`` (used by tf.custom_gradient) notes outputs whose gradient is user code; and
eager ``tf.numpy_function``, which runs its Python function directly without an op, is noted as the PyFunc
op it is in a graph. NumPy reads tensors through the buffer protocol, which cannot be hooked, so tensors
created back from NumPy values (``constant_op.convert_to_eager_tensor``) are noted instead.

When a tf.Variable is passed straight to an op (``x * v``, ``tf.matmul(x, v)``) the eager fast path reads it
in C++ without running op callbacks; it fetches the variable's ``_handle`` on the way. While armed, a
class-level ``__getattribute__`` notes such fetches made directly by a generated op wrapper (``gen_*_ops``),
and the next op's unexplained input of the variable's dtype and shape is recorded as its ReadVariableOp.

While a function is traced (``func_graph_from_py_func``: a ``tf.function``, a ``cond`` or ``while`` branch) the op
callback is lifted: graph construction is seen by graph_source instead, and a registered callback makes TensorFlow
serialise every op it builds to offer it (about 15 us an op: 25 ms of a 100-variable model's first trace).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
from tensorflow.python.eager import context, record
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import constant_op, func_graph, op_callbacks, ops
from tensorflow.python.ops import resource_variable_ops, script_ops
from tensorflow.python.util import nest

from gradtel.diagnosis import layer_sites
from gradtel.diagnosis.dataflow import CUSTOM_GRADIENT, FUNCTION, OP, Crossing, DataflowGraph, Node
from gradtel.diagnosis.frames import location_of_stack
from gradtel.diagnosis.graph_source import carries_gradient, has_half

#: Ways a tensor's values leave TensorFlow that Python code can see (NumPy's buffer-protocol reads cannot be hooked).
_ESCAPE_METHODS = ("numpy", "__array__", "__float__", "__int__", "__bool__")
#: tf.functions remembered by name at most (the newest kept).
_MAX_FUNCTIONS = 256


def _flags(tensors: Any) -> tuple[bool, ...]:
    return tuple(carries_gradient(t.dtype) for t in tensors)


def _keys(tensors: Any) -> tuple[int, ...]:
    return tuple(t._id for t in tensors)


def _scalar(copied: Any) -> float | None:
    """A copied-out scalar as a Python float (what may come back into the loss as one); None for anything else."""
    try:
        return float(copied) if np.ndim(copied) == 0 else None
    except (TypeError, ValueError):
        return None


class EagerRecorder:
    """Records eagerly executed ops into a bounded DataflowGraph while armed."""

    def __init__(self, max_nodes: int = 100_000, max_armed_ops: int = 1_000_000) -> None:
        self.max_nodes = max_nodes
        #: Ops recorded in one armed stretch before the recorder gives up by itself: a process that never steps
        #: (or only in graph mode, after long eager work) must not pay for recording forever.
        self.max_armed_ops = max_armed_ops
        self._armed_at = 0
        #: tf.functions called eagerly while recording, by the name of their call op (bounded, weak).
        self._functions: dict[str, weakref.ref] = {}
        self.graph = DataflowGraph()
        self.seq = 0
        self.armed = False
        self.failures = 0
        self._local = threading.local()
        self._pending_reads: list[tuple[int, Any, Any]] = []
        self._originals: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------------------

    def install(self) -> None:
        """Patch tensor export and record_operation (both inert while disarmed)."""
        if self._originals:
            return
        tensor_class = ops._EagerTensorBase
        for name in _ESCAPE_METHODS:
            self._originals[name] = tensor_class.__dict__[name]
            setattr(tensor_class, name, self._escape_wrapper(self._originals[name]))
        self._originals["record_operation"] = record.record_operation
        record.record_operation = self._record_operation_wrapper(record.record_operation)
        self._originals["py_func_common"] = script_ops.py_func_common
        script_ops.py_func_common = self._numpy_function_wrapper(script_ops.py_func_common)
        self._originals["convert_to_eager_tensor"] = constant_op.convert_to_eager_tensor
        constant_op.convert_to_eager_tensor = self._import_wrapper(constant_op.convert_to_eager_tensor)
        self._originals["call_flat"] = atomic_function.AtomicFunction.call_flat
        atomic_function.AtomicFunction.call_flat = self._function_call_wrapper(self._originals["call_flat"])
        self._originals["func_graph_from_py_func"] = func_graph.func_graph_from_py_func
        func_graph.func_graph_from_py_func = self._trace_wrapper(func_graph.func_graph_from_py_func)

    def uninstall(self) -> None:
        """Disarm, restore the patches and drop everything recorded."""
        self.disarm()
        if self._originals:
            for name in _ESCAPE_METHODS:
                setattr(ops._EagerTensorBase, name, self._originals[name])
            record.record_operation = self._originals["record_operation"]
            script_ops.py_func_common = self._originals["py_func_common"]
            constant_op.convert_to_eager_tensor = self._originals["convert_to_eager_tensor"]
            atomic_function.AtomicFunction.call_flat = self._originals["call_flat"]
            func_graph.func_graph_from_py_func = self._originals["func_graph_from_py_func"]
        self._functions = {}
        self._originals = {}
        self.graph = DataflowGraph()

    def arm(self) -> None:
        """Start recording eager ops."""
        if not self.armed:
            self._armed_at = self.seq
            op_callbacks.add_op_callback(self._on_op)
            resource_variable_ops.BaseResourceVariable.__getattribute__ = self._fast_path_read_hook()
            self.armed = True

    def disarm(self) -> None:
        """Stop recording; what was recorded is kept (bounded) so later steps can refer to it."""
        if self.armed:
            # Op callbacks are per thread: a recorder armed in another thread has nothing to remove here.
            with contextlib.suppress(KeyError, ValueError):
                op_callbacks.remove_op_callback(self._on_op)
            with contextlib.suppress(AttributeError):
                del resource_variable_ops.BaseResourceVariable.__getattribute__
            self._pending_reads.clear()
            self.armed = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not record inside this block (the backward pass, gradtel's own work)."""
        previous = getattr(self._local, "paused", False)
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = previous

    def clock(self) -> int:
        """The recorder's op counter: the eager counterpart of graph op ids."""
        return self.seq

    def _recording(self) -> bool:
        return self.armed and not getattr(self._local, "paused", False)

    def note_gradient(self, target: Any, sources: Any, result: Any) -> None:
        """An eager ``tape.gradient`` call, as one opaque op from the target and the sources to the gradients.

        Why: its backward ops are not recorded (the recorder pauses for them), yet a gradient can feed a loss (a
        gradient penalty, a Hessian-vector product); without this op such a loss would look computed from nothing.
        Whether the op ran while another tape recorded decides, like any op's, whether that tape sees the path.
        """
        if not self._recording():
            return
        inputs = [t for t in nest.flatten((target, sources)) if hasattr(t, "_id")]
        outputs = [t for t in nest.flatten(result) if t is not None and hasattr(t, "_id")]
        self.seq += 1
        node = Node(
            "GradientTape.gradient",
            _keys(inputs),
            _keys(outputs),
            self.seq,
            _flags(inputs),
            _flags(outputs),
            location_of_stack(2),
            FUNCTION,
        )
        self.graph.add(node)

    # -- sources of facts ------------------------------------------------------------------------------

    def _on_op(
        self, op_type: str | bytes, inputs: Any, attrs: Any, outputs: Any, op_name: Any = None, graph: Any = None
    ) -> None:
        """Op callback: add one executed op (graph construction is seen by graph_source instead)."""
        if graph is not None or not self._recording():
            return None
        try:
            if isinstance(op_type, bytes):
                op_type = op_type.decode()
            inputs, outputs = tuple(inputs or ()), tuple(outputs or ())
            self.seq += 1
            location, site = layer_sites.stack_locations(2)
            if self._pending_reads:
                self._add_fast_path_reads(inputs, location)
            kind = FUNCTION if op_type.startswith("__") else OP
            self.graph.add(
                Node(
                    op_type,
                    _keys(inputs),
                    _keys(outputs),
                    self.seq,
                    _flags(inputs),
                    _flags(outputs),
                    location,
                    kind,
                    half=has_half(outputs),
                    site=site,
                )
            )
            self.graph.trim(self.max_nodes)
            if self.seq - self._armed_at > self.max_armed_ops:
                self.disarm()
        except Exception:
            self.failures += 1
        return None

    def _add_fast_path_reads(self, inputs: tuple[Any, ...], location: str | None) -> None:
        """Attribute the op's inputs that no recorded op produced to the variables read in C++ for it.

        The C++ reads happen in input order just before the op runs, so their tensors are the newest
        unexplained inputs (tensor ids grow): match the last read to the newest candidate, and so on."""
        pending = list(dict.fromkeys(self._pending_reads))
        self._pending_reads = []
        orphans = sorted((t for t in inputs if t._id not in self.graph.producer), key=lambda t: -t._id)
        for handle_key, dtype, shape in reversed(pending):
            for tensor in orphans:
                if tensor.dtype == dtype and tensor.shape == shape:
                    orphans = [t for t in orphans if t is not tensor]  # not list.remove: == on tensors is an op
                    self.graph.add(
                        Node(
                            "ReadVariableOp",
                            (handle_key,),
                            (tensor._id,),
                            self.seq,
                            (True,),
                            (carries_gradient(dtype),),
                            location,
                        )
                    )
                    break

    def _fast_path_read_hook(self) -> Any:
        recorder = self
        generic = object.__getattribute__

        def __getattribute__(variable: Any, name: str) -> Any:
            value = generic(variable, name)
            if name == "_handle" and recorder._recording() and context.executing_eagerly():
                caller = sys._getframe(1).f_code.co_filename
                if os.path.basename(caller).startswith("gen_"):
                    with contextlib.suppress(Exception):
                        recorder._pending_reads.append(
                            (value._id, generic(variable, "_dtype"), generic(variable, "_shape"))
                        )
            return value

        return __getattribute__

    def _escape_wrapper(self, method: Any) -> Any:
        recorder = self

        def exported(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            noted: tuple[int, str | None] | None = None  # when and where, taken here: the caller's frame
            if recorder._recording():
                with contextlib.suppress(Exception):
                    noted = (recorder.seq, location_of_stack(2))
            copied = method(tensor, *args, **kwargs)
            if noted is not None:
                with contextlib.suppress(Exception):
                    if method.__name__ == "__bool__":  # an `if` on the tensor: a decision, no value to come back
                        crossing = Crossing(tensor._id, *noted, decision=True)
                    else:
                        crossing = Crossing(tensor._id, *noted, value=_scalar(copied), shape=np.shape(copied))
                    recorder.graph.add_escape(crossing)
            return copied

        exported.__name__ = method.__name__
        exported.__doc__ = method.__doc__
        return exported

    def _record_operation_wrapper(self, original: Any) -> Any:
        recorder = self

        def record_operation(op_type: str, output_tensors: Any, input_tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if recorder._recording() and context.executing_eagerly() and not op_type.startswith("__"):
                with contextlib.suppress(Exception):
                    recorder.seq += 1
                    recorder.graph.add(
                        Node(
                            op_type,
                            _keys(input_tensors),
                            _keys(output_tensors),
                            recorder.seq,
                            _flags(input_tensors),
                            _flags(output_tensors),
                            location_of_stack(2),
                            CUSTOM_GRADIENT,
                            label=op_type,
                        )
                    )
            return original(op_type, output_tensors, input_tensors, *args, **kwargs)

        return record_operation

    def _numpy_function_wrapper(self, original: Any) -> Any:
        recorder = self

        def py_func_common(func: Any, inp: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(func, inp, *args, **kwargs)
            if recorder._recording() and context.executing_eagerly():
                with contextlib.suppress(Exception):
                    inputs = [t for t in nest.flatten(inp) if hasattr(t, "_id")]
                    outputs = [t for t in nest.flatten(result) if hasattr(t, "_id")]
                    recorder.seq += 1
                    recorder.graph.add(
                        Node(
                            "PyFunc",
                            _keys(inputs),
                            _keys(outputs),
                            recorder.seq,
                            _flags(inputs),
                            _flags(outputs),
                            location_of_stack(2),
                        )
                    )
            return result

        return py_func_common

    def function_graph(self, name: str) -> Any:
        """The FuncGraph of the tf.function whose eager call ran as op ``name``, if it was called while recording."""
        ref = self._functions.get(name)
        function = ref() if ref is not None else None
        return function.graph if function is not None else None

    def _function_call_wrapper(self, original: Any) -> Any:
        recorder = self

        def call_flat(function: Any, *args: Any) -> Any:
            if recorder._recording() and context.executing_eagerly():
                with contextlib.suppress(Exception):
                    name = function.name
                    recorder._functions[name.decode() if isinstance(name, bytes) else name] = weakref.ref(function)
                    while len(recorder._functions) > _MAX_FUNCTIONS:
                        del recorder._functions[next(iter(recorder._functions))]
            return original(function, *args)

        return call_flat

    def _trace_wrapper(self, original: Any) -> Any:
        recorder = self

        def func_graph_from_py_func(*args: Any, **kwargs: Any) -> Any:
            lifted = recorder._on_op in context.context().op_callbacks  # per thread, like the callbacks
            if lifted:
                with contextlib.suppress(KeyError, ValueError):
                    op_callbacks.remove_op_callback(recorder._on_op)
            try:
                return original(*args, **kwargs)
            finally:
                # disarmed while tracing (a graph step was diagnosed): stays off; armed: back on
                if lifted and recorder.armed and recorder._on_op not in context.context().op_callbacks:
                    with contextlib.suppress(Exception):
                        op_callbacks.add_op_callback(recorder._on_op)

        return func_graph_from_py_func

    def _import_wrapper(self, original: Any) -> Any:
        recorder = self

        def convert_to_eager_tensor(value: Any, *args: Any, **kwargs: Any) -> Any:
            tensor = original(value, *args, **kwargs)
            from_numpy = isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "fc"
            if (from_numpy or isinstance(value, float)) and recorder._recording() and carries_gradient(tensor.dtype):
                with contextlib.suppress(Exception):
                    where = location_of_stack(2)
                    crossing = Crossing(tensor._id, recorder.seq, where, from_numpy, _scalar(value), np.shape(value))
                    recorder.graph.add_import(crossing)
            return tensor

        return convert_to_eager_tensor
