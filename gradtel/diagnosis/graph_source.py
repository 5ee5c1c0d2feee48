"""Graph mode: turn a FuncGraph (at trace time) into the abstract dataflow graph.

Control flow and nested functions keep their bodies in separate FuncGraphs (If/Case branches, While bodies,
PartitionedCall functions). They are inlined with synthetic link nodes, so the walker sees one flat graph
and can find a cut inside a branch or a nested tf.function. Every inlined op inherits the ``seq`` (op id) of
the top-level op that holds it, which is what the tape's recording intervals are measured in.
"""

from __future__ import annotations

import functools
from typing import Any

import tensorflow as tf
from tensorflow.python.framework.ops import EagerTensor

from gradtel.diagnosis import layer_sites
from gradtel.diagnosis.dataflow import CUSTOM_GRADIENT, FUNCTION, LINK, DataflowGraph, Node, Where
from gradtel.diagnosis.frames import location_of_traceback

_IF_OPS = frozenset({"If", "StatelessIf"})
_CASE_OPS = frozenset({"Case", "StatelessCase"})
_WHILE_OPS = frozenset({"While", "StatelessWhile"})
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_CONTROL_FLOW_OPS = _IF_OPS | _CASE_OPS | _WHILE_OPS | _CALL_OPS
_MAX_DEPTH = 8


@functools.lru_cache(maxsize=256)
def carries_gradient(dtype: Any) -> bool:
    """Whether a tensor or variable of this dtype can carry a gradient (as backprop_util.IsTrainable): floating,
    complex, or a resource/variant handle; False for anything TensorFlow does not know as a dtype (None included).

    Cached per dtype: asked for every input and output of every op the diagnosis sees (a DType's properties cost
    about a microsecond each, which added up to a tenth of a large model's recorded construction)."""
    try:
        dtype = tf.as_dtype(dtype).base_dtype
    except TypeError:
        return False
    return dtype.is_floating or dtype.is_complex or dtype in (tf.resource, tf.variant)


def has_half(tensors: Any) -> bool:
    """Whether one of these tensors is float16 (its gradient can underflow to zero without loss scaling)."""
    return any(t.dtype is _HALF for t in tensors)


_HALF = tf.float16  # DTypes are interned: identity is the cheap comparison


def _op_location(op: Any) -> str | None:
    try:
        return location_of_traceback(op.traceback)
    except Exception:
        return None


def _flags(tensors: Any) -> tuple[bool, ...]:
    return tuple(carries_gradient(t.dtype) for t in tensors)


#: Where an op sits: inside which cond's branch (its location, and (cond, branch index)), or (None, None).
_Inside = tuple[Where, tuple[int, int] | None]


def build(graph: Any) -> DataflowGraph:
    """The dataflow graph of a FuncGraph as it stands now (ops added later are not seen)."""
    flow = DataflowGraph()
    _add_graph(flow, graph, seq=None, inside=(None, None), depth=0, filled=False)
    return flow


def _add_graph(flow: DataflowGraph, graph: Any, seq: int | None, inside: _Inside, depth: int, filled: bool) -> None:
    """Add ``graph``'s ops; ``filled``: inside a cond branch or a loop body, where TensorFlow's control-flow gradients
    turn a None gradient into zeros; ``inside``: inside a cond branch, where and which (Node)."""
    branch, branch_of = inside
    for op in graph.get_operations():
        if op.type == "Placeholder" and op.outputs[0]._id in flow.producer:
            continue  # a body's argument: already produced by the link from the caller's input
        op_seq = op._id if seq is None else seq
        if depth < _MAX_DEPTH and _inline(flow, graph, op, op_seq, inside, depth, filled):
            continue
        kind = CUSTOM_GRADIENT if "_gradient_op_type" in op.node_def.attr else _kind_of(op)
        flow.add(
            Node(
                op.type,
                tuple(t._id for t in op.inputs),
                tuple(t._id for t in op.outputs),
                op_seq,
                _flags(op.inputs),
                _flags(op.outputs),
                functools.partial(_op_location, op),
                kind,
                branch=branch,
                in_branch=branch is not None,
                branch_of=branch_of,
                site=functools.partial(layer_sites.op_site, op),
                half=has_half(op.outputs),
                zero_filled=filled,
            )
        )


def _kind_of(op: Any) -> str:
    return FUNCTION if op.type in _CONTROL_FLOW_OPS else "op"


def _link(
    flow: DataflowGraph,
    sources: list[Any],
    target: Any,
    seq: int,
    op: Any,
    inside: tuple[Where, tuple[int, int] | None],
) -> None:
    branch, branch_of = inside
    flow.add(
        Node(
            "Identity",
            tuple(t._id for t in sources),
            (target._id,),
            seq,
            _flags(sources),
            (carries_gradient(target.dtype),),
            functools.partial(_op_location, op),
            LINK,
            branch=branch,
            in_branch=branch is not None,
            branch_of=branch_of,
        )
    )


def _inline(
    flow: DataflowGraph,
    graph: Any,
    op: Any,
    seq: int,
    inside: _Inside,
    depth: int,
    filled: bool,
) -> bool:
    """Add a control-flow or call op as its bodies linked to its inputs and outputs; False if not one.

    A body may have more outputs than its op: once a tape differentiates a call, TensorFlow appends the
    intermediates its backward function needs to the forward FuncGraph's outputs. The op's outputs are the first
    ones."""
    try:
        bodies = _bodies(graph, op)
    except Exception:
        return False
    if bodies is None:
        return False
    kind, graphs = bodies
    inputs, outputs = list(op.inputs), list(op.outputs)
    if kind == "call":
        (body,) = graphs
        if len(body.inputs) != len(inputs) or len(body.outputs) < len(outputs):
            return False
        for outer, inner in zip(inputs, body.inputs, strict=True):
            _link(flow, [outer], inner, seq, op, inside)
        _add_graph(flow, body, seq, inside, depth + 1, filled)
        for inner, outer in zip(body.outputs[: len(outputs)], outputs, strict=True):
            _link(flow, [inner], outer, seq, op, inside)
        return True
    if kind == "branches":
        args = inputs[1:]
        if any(len(b.inputs) != len(args) or len(b.outputs) < len(outputs) for b in graphs):
            return False
        site = functools.partial(_op_location, op)
        cond = len(flow.nodes)  # one number per cond of this flow
        for index, body in enumerate(graphs):
            in_body = (site, (cond, index))
            for outer, inner in zip(args, body.inputs, strict=True):
                _link(flow, [outer], inner, seq, op, in_body)
            _add_graph(flow, body, seq, in_body, depth + 1, True)
        for j, outer in enumerate(outputs):  # the predicate (or branch index) decides the outputs too: no gradient
            _link(flow, [inputs[0], *(body.outputs[j] for body in graphs)], outer, seq, op, inside)
        return True
    (body,) = graphs
    if not (len(body.inputs) == len(body.outputs) == len(inputs) == len(outputs)):
        return False
    for j, inner in enumerate(body.inputs):
        _link(flow, [inputs[j], body.outputs[j]], inner, seq, op, inside)
    _add_graph(flow, body, seq, inside, depth + 1, True)
    for j, outer in enumerate(outputs):
        _link(flow, [inputs[j], body.outputs[j]], outer, seq, op, inside)
    return True


def _bodies(graph: Any, op: Any) -> tuple[str, list[Any]] | None:
    """("call"|"branches"|"loop", body FuncGraphs) for control flow and call ops; None for other ops."""
    if op.type in _IF_OPS:
        then_graph, else_graph = getattr(op, "_true_graph", None), getattr(op, "_false_graph", None)
        if then_graph is None or else_graph is None:
            names = [op.get_attr("then_branch").name, op.get_attr("else_branch").name]
            return "branches", [_function_graph(graph, name) for name in names]
        return "branches", [then_graph, else_graph]
    if op.type in _CASE_OPS:
        branch_graphs = getattr(op, "_branch_graphs", None)
        if branch_graphs is None:
            branch_graphs = [_function_graph(graph, f.name) for f in op.get_attr("branches")]
        return "branches", list(branch_graphs)
    if op.type in _WHILE_OPS:
        body = getattr(op, "_body_graph", None) or _function_graph(graph, op.get_attr("body").name)
        return "loop", [body]
    if op.type in _CALL_OPS:
        return "call", [_function_graph(graph, op.get_attr("f").name)]
    return None


def _function_graph(graph: Any, name: str) -> Any:
    """The FuncGraph of a function registered in ``graph`` or one of its outer graphs."""
    while graph is not None:
        function = graph._get_function(name)
        if function is not None and getattr(function, "graph", None) is not None:
            return function.graph
        graph = getattr(graph, "outer_graph", None)
    raise LookupError(name)


def captured_values(graph: Any) -> dict[int, int]:
    """Tensor id in ``graph`` -> id of the eager tensor it captures, for captured values that are not handles.

    Such a value was computed before the step was traced (in ``build()``, before the tape): when the eager
    recorder saw it computed from a variable, the variable's gradient is cut there.
    """
    return {
        internal._id: external._id
        for external, internal in graph.captures
        if isinstance(external, EagerTensor) and external.dtype != tf.resource
    }


class VariableKeys:
    """Tensor ids under which each variable's handle is visible in ``graph``: its captured placeholder, following
    captures through nested FuncGraphs (an inner graph may capture the outer placeholder).

    Built once per diagnosis from every capture of the graph chain, so looking up N variables costs O(captures + N),
    not O(captures) each (a 10,000-variable step has 10,000 captures).
    """

    def __init__(self, graph: Any) -> None:
        self._graph = graph
        chain = []
        current = graph
        while current is not None and hasattr(current, "captures"):
            chain.append(current)
            current = getattr(current, "outer_graph", None)
        roots: dict[int, set[int]] = {}  # id of a tensor -> ids of the outermost handles it stands for
        self._keys: dict[int, set[int]] = {}
        for depth, func_graph in enumerate(reversed(chain)):
            innermost = depth == len(chain) - 1
            for external, internal in func_graph.captures:
                for root in roots.get(id(external), (id(external),)):
                    roots.setdefault(id(internal), set()).add(root)
                    if innermost:
                        self._keys.setdefault(root, set()).add(internal._id)

    def __call__(self, handle: Any) -> set[int]:
        """The tensor ids of ``handle`` in the graph (empty when the graph never captured it)."""
        keys = set(self._keys.get(id(handle), ()))
        if getattr(handle, "graph", None) is self._graph:
            keys.add(handle._id)
        return keys
