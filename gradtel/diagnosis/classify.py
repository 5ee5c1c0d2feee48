"""The walker: why a variable's gradient is None, or what would make it zero, on a DataflowGraph.

The same code serves graph and eager mode. Sets of tensor ids answer every question:
    B = ancestors of the loss (any edge)            -> does the variable influence the loss at all?
    R = descendants of the variable's handle        -> what did it feed?
    G = tensors a gradient from the loss reaches    -> crossing only recorded ops that pass gradients
                                                       through inputs whose dtype can carry one.
A path exists when R and B meet. The gradient stops where an edge leaves R - G into G: that op is the cut,
and its kind names the category (not recorded -> outside_tape, StopGradient, assign, an op without a
gradient, or an integer edge whose producer is blamed).

Cost: B and G are computed once per step and shared by every variable; the zero hints, asked for every variable
with a gradient, read per-tensor tables built in one pass over the graph (``DataflowGraph.newest_downstream``), so
a step of N variables costs O(graph + N), not O(graph x N). Only missing variables get a walk of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from gradtel.diagnosis import graph_source
from gradtel.diagnosis.cause import UNKNOWN, Cause, ReluCheck, make_cause
from gradtel.diagnosis.dataflow import CUSTOM_GRADIENT, FUNCTION, LINK, OP, Crossing, DataflowGraph, Node
from gradtel.diagnosis.op_rules import (
    ADDING_OPS,
    ASSIGN_OPS,
    CLIPPING_OPS,
    CONSTANT_OPS,
    GATING_ACTIVATIONS,
    MULTIPLYING_OPS,
    SATURATING_OPS,
    SELECT_OPS,
    USER_GRADIENT_OPS,
    ZERO_GRADIENT_OPS,
    ZERO_KEEPING_OPS,
    blocking_category,
    describe_op,
)
from gradtel.diagnosis.tape_hook import GradientCall
from gradtel.diagnosis.variables import handle

#: A zero-gradient rule: its category, the tensors a gradient reaches while avoiding the rule's nodes, and per
#: tensor the newest rule node on a gradient path from it (the culprit a hint names).
ZeroRule = tuple[str, set[int], dict[int, Node]]


@dataclass
class Analysis:
    """One gradient call on one dataflow graph, with the reachability sets computed once and shared."""

    flow: DataflowGraph
    call: GradientCall
    step_start: int = -1
    read_in_pipeline: Callable[[Any], tuple[bool, str | None]] = lambda resource: (False, None)
    #: Eager mode: the FuncGraph of a tf.function by the name its call op ran under (None when unknown).
    function_graph: Callable[[str], Any] = lambda name: None
    #: Graph mode: the eager recording, and which graph tensors capture eager values (graph id -> eager id).
    earlier: DataflowGraph | None = None
    captured: dict[int, int] = field(default_factory=dict)
    trainable_keys: set[int] = field(default_factory=set)

    def recorded(self, node: Node) -> bool:
        """Whether the tape was recording when this op ran (or was created, in a FuncGraph)."""
        return self.in_tape(node.seq)

    def in_tape(self, seq: int) -> bool:
        """Whether the tape was recording at this point of the clock."""
        return any(start < seq <= end for start, end in self.call.intervals)

    def passes(self, node: Node) -> bool:
        """Whether the gradient crosses this node (opaque nodes are assumed to pass)."""
        if node.kind == LINK:
            return True
        if not self.recorded(node):
            return False
        if node.kind in (FUNCTION, CUSTOM_GRADIENT):
            return True
        return blocking_category(node.op_type) is None

    @cached_property
    def targets(self) -> tuple[int, ...]:
        """The differentiated tensors in the flow (a variable target stands for its latest written value)."""
        return tuple(self.flow.value_of(key) for key in self.call.targets)

    @cached_property
    def loss_ancestors(self) -> set[int]:
        return self.flow.ancestors(self.targets, self.crosses)

    def crosses(self, node: Node) -> bool:
        """Whether a path to the loss may run through this node. A variable assigned before the tape and read inside
        it is read as a variable: the history of its new value (an optimizer's update computed from another loss,
        in a GAN's step) is no path to this loss; an assignment inside the tape is one (stateful_assign)."""
        return node.op_type not in ASSIGN_OPS or self.recorded(node)

    @cached_property
    def gradient_reach(self) -> set[int]:
        return self.flow.gradient_ancestors(self.targets, self.passes)

    def zero_reach_avoiding(self, avoid: Callable[[Node], bool]) -> set[int]:
        """Like zero_reach, but the gradient may not cross nodes for which ``avoid`` holds."""
        return self.flow.gradient_ancestors(self.targets, lambda n: not avoid(n) and self.zero_passes(n))

    @cached_property
    def loss_location(self) -> str | None:
        for key in self.targets:
            node = self.flow.producer.get(key)
            if node is not None:
                return node.location()
        return None

    @cached_property
    def imports_into_loss(self) -> list[Crossing]:
        """Each tensor created from a NumPy value or a Python float inside the tape that entered the loss's
        ancestry."""
        return [
            c
            for c in self.flow.imports
            if c.tensor in self.loss_ancestors and c.seq > self.step_start and self.in_tape(c.seq)
        ]

    def zero_passes(self, node: Node) -> bool:
        """Whether a (possibly zero) gradient crosses this node: as ``passes``, and also an op without a gradient
        inside a cond branch or a loop body, whose None TensorFlow's control-flow gradient turns into zeros."""
        return self.passes(node) or (node.zero_filled and node.kind == OP and self.recorded(node))

    @cached_property
    def zero_reach(self) -> set[int]:
        """Tensors that get a gradient, zeros included."""
        return self.flow.gradient_ancestors(self.targets, self.zero_passes)

    @cached_property
    def zero_rules(self) -> list[ZeroRule]:
        """Each zero rule that some node of this graph matches, with its shared reachability tables."""
        rules = []
        for category, avoid, blame in _ZERO_RULES:
            if any(avoid(n) for n in self.flow.nodes):
                rules.append((category, self.zero_reach_avoiding(avoid), self._culprits(blame)))
        return rules

    @cached_property
    def clipping(self) -> tuple[set[int], dict[int, Node]]:
        """The tensors a gradient reaches without crossing a clip (``CLIPPING_OPS``, whose gradient is exactly zero
        over whole ranges of inputs), and per tensor the newest clip on a path from it."""
        on = lambda n: n.op_type in CLIPPING_OPS  # noqa: E731
        return self.zero_reach_avoiding(on), self._culprits(on)

    @cached_property
    def entered_branches(self) -> dict[int, frozenset[tuple[int, int]]]:
        """Per tensor, the cond branches (cond, index) that a gradient path from it to the loss enters; one pass,
        newest node first, as ``DataflowGraph.newest_downstream``."""
        reach, flow = self.zero_reach, self.flow
        entered: dict[int, frozenset[tuple[int, int]]] = {}
        for node in reversed(flow.nodes):
            found: frozenset[tuple[int, int]] = frozenset()
            if node.branch_of is not None and any(k in reach for k in node.outputs):
                found = frozenset((node.branch_of,))
            for out in node.outputs:
                if flow.producer.get(out) is node and out in entered:
                    found |= entered[out]
            if found:
                for key in node.inputs:
                    entered[key] = entered[key] | found if key in entered else found
        return entered

    def in_both_branches(self, keys: set[int]) -> bool:
        """Whether gradient paths from these tensors enter two branches of one cond: one of them was taken."""
        seen: dict[int, int] = {}
        for cond, index in (b for k in keys for b in self.entered_branches.get(k, ())):
            if seen.setdefault(cond, index) != index:
                return True
        return False

    @cached_property
    def half_on_path(self) -> dict[int, Node]:
        """Per tensor, the newest float16 op on a gradient path from it to the loss."""
        return self._culprits(lambda n: n.half and n.kind != LINK)

    def _culprits(self, on_node: Callable[[Node], bool]) -> dict[int, Node]:
        reach = self.zero_reach
        return self.flow.newest_downstream(lambda n: on_node(n) and any(k in reach for k in n.outputs))

    def step_reads(self, keys: set[int]) -> list[Node]:
        """Ops that read the variable during the current step."""
        return [n for n in self.flow.readers(keys) if n.seq > self.step_start]


def _cut_nodes(analysis: Analysis, reach_from_var: set[int], reach: set[int]) -> list[tuple[Node, int]]:
    """(node, input) pairs where the gradient from the loss reaches the node's output but not its input,
    and the input was computed from the variable; newest (closest to the loss) first."""
    cuts = []
    for key in reach_from_var - reach:
        for node, out in analysis.flow.live_consumers(key):
            if out in reach:
                cuts.append((node, key))
    return sorted(cuts, key=lambda cut: -cut[0].seq)


def _integer_source(flow: DataflowGraph, key: int, reach_from_var: set[int]) -> Node | None:
    """The op that turned a floating path into an integer/bool one: walk back over non-differentiable
    tensors computed from the variable until an op with a differentiable input on the path."""
    seen: set[int] = set()
    stack = [key]
    while stack:
        node = flow.producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        on_path = [(k, ok) for k, ok in zip(node.inputs, node.in_ok, strict=True) if k in reach_from_var]
        if any(ok for _, ok in on_path):
            return node
        stack.extend(k for k, _ in on_path)
    return None


def _integer_source_inside(analysis: Analysis, call: Node, reach_from_var: set[int]) -> Node | None:
    """Eager mode: where the path turns integer/bool inside the tf.function this call ran (its FuncGraph, noted by
    the recorder), walked back from the call's integer outputs computed from the variable; None when unknown."""
    graph = analysis.function_graph(call.op_type)
    if graph is None or len(graph.inputs) != len(call.inputs) or len(graph.outputs) != len(call.outputs):
        return None
    body = graph_source.build(graph)
    inner = body.descendants(t._id for t, k in zip(graph.inputs, call.inputs, strict=True) if k in reach_from_var)
    for tensor, key, ok in zip(graph.outputs, call.outputs, call.out_ok, strict=True):
        if key in reach_from_var and not ok:
            source = _integer_source(body, tensor._id, inner)
            if source is not None:
                return source
    return None


def explain_missing(analysis: Analysis, variable: Any, keys: set[int], name: str) -> Cause:
    """The cause of a None gradient for a trainable, floating variable whose handle has ``keys``."""
    reach_from_var = analysis.flow.descendants(keys, crosses=analysis.crosses)
    if not (reach_from_var & analysis.loss_ancestors):
        return _no_path(analysis, variable, keys, name, reach_from_var)
    reach = analysis.gradient_reach
    if keys & reach:
        return _unexplained(analysis, variable, keys, name, reach_from_var)
    # Where the gradient reaches a tensor computed from the variable, the cut is upstream of it: a tensor past it
    # (the bool condition of a where() on a prediction the gradient did reach) is no cut.
    reach_from_var = analysis.flow.descendants(keys, stop=reach, crosses=analysis.crosses)
    cuts = _cut_nodes(analysis, reach_from_var, reach)
    if not cuts:
        return make_cause(UNKNOWN, f"No cut was found on the paths from `{name}` to the loss")
    node, key = cuts[0]
    return _cut_cause(analysis, node, key, name, reach_from_var)


def _no_path(analysis: Analysis, variable: Any, keys: set[int], name: str, reach_from_var: set[int]) -> Cause:
    """No path from the variable to the loss: its values escaped to NumPy and came back, the loss depends on no
    variable at all, the variable was not read, or what it fed does not reach the loss.

    ``left_tensorflow`` needs evidence of a round trip: a value computed from the variable was copied out
    (``.numpy()``, ``float()``) and after it what came back into the loss could be the copy (``_came_back``); or
    the loss depends on no trainable variable but on a NumPy value created after the variable was used. A tensor
    fed to a model from NumPy, or an output that is simply unused, is not one. A copy for logging followed by a
    Python constant in a loss that does depend on other variables (``0.5 * loss``), or an actor's probabilities
    copied out to sample an action followed by the rewards' returns in the critic's loss, could be either, so it is
    ``unknown``.
    """
    crossed = [
        e
        for e in analysis.flow.escapes
        if e.tensor in reach_from_var and e.seq > analysis.step_start and analysis.in_tape(e.seq)
    ]
    escapes = [e for e in crossed if not e.decision]
    decision = next((e for e in crossed if e.decision and e.tensor in analysis.flow.producer), None)
    if decision is not None:  # as a cond's predicate in graph mode: the path turns boolean there
        source = analysis.flow.producer[decision.tensor]
        return make_cause(
            "non_differentiable_op",
            f"`{name}` only decides a Python `if` (at {decision.location}) through {describe_op(source.op_type)}, "
            "whose boolean has no gradient",
            op=source.op_type,
            location=source.blamed_location(),
        )
    returns = analysis.imports_into_loss
    whole_loss = not (analysis.loss_ancestors & analysis.trainable_keys)  # nothing trainable left in the loss
    for escape in escapes:
        if any(_came_back(c, escape, whole_loss) for c in returns if c.seq >= escape.seq):
            return make_cause(
                "left_tensorflow",
                f"A value computed from `{name}` was converted to NumPy inside the tape and the loss was "
                "computed from the copy",
                location=escape.location,
            )
    if escapes and returns and any(c.seq >= escapes[0].seq for c in returns):
        return make_cause(
            UNKNOWN,
            f"A value computed from `{name}` was copied out of TensorFlow inside the tape (at "
            f"{escapes[0].location}) and Python numbers entered the loss after it: the loss may have been computed "
            "from the copy (left_tensorflow), or the value is unused (not_on_loss_path)",
        )
    stale = _stale_capture(analysis, variable)
    if stale is not None:
        return make_cause(
            "outside_tape",
            f"A value computed from `{name}` before the step (here) is used in the step as a constant, so the "
            "gradient cannot reach the variable",
            op=stale.op_type,
            location=stale.location(),
        )
    if not (analysis.loss_ancestors & analysis.trainable_keys):
        reentry = _numpy_reentry(analysis, reach_from_var)
        if reentry is not None:
            return make_cause(
                "left_tensorflow",
                f"The loss is computed from a value that re-entered TensorFlow after `{name}` was used here "
                "(NumPy maths on a tensor)",
                location=reentry.location(),
            )
        return make_cause(
            "loss_disconnected",
            f"The loss does not depend on any trainable variable, so `{name}` gets no gradient",
            location=analysis.loss_location,
        )
    reads = analysis.step_reads(keys)
    recorded_reads = [n for n in reads if analysis.recorded(n)]
    if not recorded_reads:
        # Eager mode also records the dataset op that captures the variable (MapDataset): not a read in the tape.
        in_pipeline, where = analysis.read_in_pipeline(handle(variable))
        if in_pipeline:
            return make_cause(
                "outside_tape",
                f"`{name}` is read in a tf.data function (Dataset.map...), which runs outside the GradientTape: "
                "the step gets its result as data",
                location=where,
            )
    if not reads:
        return make_cause("unused", f"`{name}` was not read during this step")
    if not recorded_reads:  # read, but only while no tape recorded: whatever it fed is not on the tape
        return make_cause(
            UNKNOWN,
            f"`{name}` is read, but only while no tape was recording (at {reads[0].location()}), and nothing "
            "computed from it reaches the loss: a copy made before the tape (outside_tape), or a read this step "
            "does not use (unused)",
        )
    unseen = _numbers_after(analysis, reach_from_var)
    if unseen is not None:
        return make_cause(
            UNKNOWN,
            f"`{name}` is read inside the tape (at {recorded_reads[0].location()}) and NumPy numbers entered the loss "
            f"after values were computed from it (at {unseen.location}): NumPy reads a tensor without a copy gradtel "
            "can see (np.log(t)), so the loss may have been computed from them (left_tensorflow), or they are "
            "unrelated (not_on_loss_path)",
        )
    return make_cause(
        "not_on_loss_path",
        f"`{name}` is read inside the tape but nothing computed from it reaches the loss",
        location=recorded_reads[0].read_location(),
    )


def _numbers_after(analysis: Analysis, reach_from_var: set[int]) -> Crossing | None:
    """The first NumPy number (a scalar, not an array: targets and inputs come as arrays) that entered the loss
    after a value was computed from the variable in this step; None if none did."""
    flow = analysis.flow
    computed = [n.seq for k in reach_from_var if (n := flow.producer.get(k)) is not None and analysis.recorded(n)]
    first = min((seq for seq in computed if seq > analysis.step_start), default=None)
    if first is None:
        return None
    return next((c for c in analysis.imports_into_loss if c.numpy and not c.shape and c.seq > first), None)


def _came_back(value: Crossing, escape: Crossing, whole_loss: bool) -> bool:
    """Whether a value that entered the loss after ``escape`` may be the copy come back: any, when the loss
    depends on no trainable variable any more; else the copied number itself, or a NumPy array with the copy's
    leading (batch) dimension (NumPy maths on the copy: a clip, a square, an argmax along the last axis)."""
    if whole_loss or (value.value is not None and value.value == escape.value):
        return True
    return value.numpy and bool(value.shape) and bool(escape.shape) and value.shape[0] == escape.shape[0]


def _stale_capture(analysis: Analysis, variable: Any) -> Node | None:
    """Graph mode: the eager op that computed, from the variable, a value the traced step captured and feeds to the
    loss (a kernel derived once in ``build()``); None when the eager recorder saw no such thing."""
    earlier, resource = analysis.earlier, handle(variable)
    if earlier is None or not analysis.captured or resource is None or not hasattr(resource, "_id"):
        return None
    derived = earlier.descendants({resource._id})
    stale = [
        external
        for internal, external in analysis.captured.items()
        if internal in analysis.loss_ancestors and external in derived and external in earlier.producer
    ]
    return max((earlier.producer[key] for key in stale), key=lambda n: n.seq) if stale else None


def _numpy_reentry(analysis: Analysis, reach_from_var: set[int]) -> Node | None:
    """NumPy reads tensors through the buffer protocol, which cannot be hooked; what shows is a loss
    computed from a tensor created from a NumPy value inside the tape after the variable fed an op. Blame
    the newest op computed from the variable before that value came back."""
    flow = analysis.flow
    returns = [c.seq for c in analysis.imports_into_loss if c.numpy]
    if not returns:
        return None
    derived = [flow.producer[k] for k in reach_from_var if k in flow.producer]
    before = [n for n in derived if analysis.step_start < n.seq <= max(returns) and analysis.recorded(n)]
    return max(before, key=lambda n: n.seq) if before else None


def _unexplained(analysis: Analysis, variable: Any, keys: set[int], name: str, reach_from_var: set[int]) -> Cause:
    """The gradient could reach the variable by the static rules, yet it is None: the tape did not watch
    it, or an op whose gradient is user code (custom_gradient, py_function, a function) returned None."""
    reads = [n for n in analysis.step_reads(keys) if analysis.recorded(n)]
    if reads and not analysis.call.watches(variable):
        # The line to edit is the tape's (or a tape.watch next to it), not the read.
        return make_cause(
            "outside_tape",
            f"`{name}` is read while the tape records (at {reads[0].location()}), but the tape never watched it "
            "(watch_accessed_variables=False without tape.watch)",
            location=analysis.call.tape_location or reads[0].location(),
        )
    on_path = [
        n
        for n in analysis.flow.nodes
        if (n.kind in (CUSTOM_GRADIENT, FUNCTION) or n.op_type in USER_GRADIENT_OPS)
        and any(k in reach_from_var for k in n.inputs)
        and any(k in analysis.loss_ancestors for k in n.outputs)
    ]
    if on_path:
        node = min(on_path, key=lambda n: (n.kind != CUSTOM_GRADIENT, -n.seq))
        if node.kind == CUSTOM_GRADIENT:
            label = f"tf.custom_gradient function `{node.label}`" if node.label else "a tf.custom_gradient"
            return make_cause(
                "non_differentiable_op",
                f"The gradient function of {label} returns None for `{name}`",
                op="custom_gradient",
                location=node.blamed_location(),
            )
        inner = _blocking_inside(analysis, node) if node.kind == FUNCTION else None
        if inner is not None:
            return make_cause(
                "non_differentiable_op",
                f"`{name}` reaches the loss through a tf.function whose {describe_op(inner.op_type)} has no gradient",
                op=inner.op_type,
                location=inner.location() or node.blamed_location(),
            )
        return make_cause(
            "non_differentiable_op",
            f"The gradient of {describe_op(node.op_type)} on the path from `{name}` to the loss is None",
            op=node.op_type,
            location=node.blamed_location(),
        )
    return make_cause(UNKNOWN, f"No cut was found on the paths from `{name}` to the loss")


def _blocking_inside(analysis: Analysis, node: Node) -> Node | None:
    """Eager mode: the newest op without a gradient between the inputs and outputs of the tf.function this call
    ran (its FuncGraph, noted by the recorder when it was called), or None when it is not known."""
    graph = analysis.function_graph(node.op_type)
    if graph is None:
        return None
    body = graph_source.build(graph)
    downstream = body.descendants(t._id for t in graph.inputs)
    upstream = body.ancestors(t._id for t in graph.outputs)
    blocking = [
        n
        for n in body.nodes
        if n.kind == OP
        and blocking_category(n.op_type) is not None
        and any(k in downstream for k in n.inputs)
        and any(k in upstream for k in n.outputs)
    ]
    return max(blocking, key=lambda n: n.seq) if blocking else None


def _cut_cause(analysis: Analysis, node: Node, key: int, name: str, reach_from_var: set[int]) -> Cause:
    if node.kind != LINK and not analysis.recorded(node):
        return make_cause(
            "outside_tape",
            f"The value computed from `{name}` here is used in the loss but was computed while the "
            "GradientTape was not recording",
            op=node.op_type,
            location=node.location(),
        )
    index = node.inputs.index(key)
    if not node.in_ok[index]:
        source = _integer_source(analysis.flow, key, reach_from_var) or node
        if source.kind == FUNCTION:  # eager mode: the op in the called tf.function's body, as in graph mode
            source = _integer_source_inside(analysis, source, reach_from_var) or source
        return make_cause(
            "non_differentiable_op",
            f"The path from `{name}` to the loss becomes integer/bool at {describe_op(source.op_type)}, "
            "which has no gradient",
            op=source.op_type,
            location=source.blamed_location(),
        )
    category = blocking_category(node.op_type) or UNKNOWN
    details = {
        "stop_gradient": f"`{name}` reaches the loss only through tf.stop_gradient",
        "stateful_assign": f"`{name}` reaches the loss only through {node.op_type} (Variable.assign), "
        "which is not differentiated",
        "non_differentiable_op": f"`{name}` reaches the loss only through {describe_op(node.op_type)}, "
        "which has no gradient",
    }
    detail = details.get(category, f"The path from `{name}` to the loss stops at {node.op_type}")
    return make_cause(category, detail, op=node.op_type, location=node.blamed_location())


def _zero_op(node: Node) -> bool:
    """An op whose gradient is zero: zero almost everywhere (Sign), or none at all inside control flow (zero-filled)."""
    return node.op_type in ZERO_GRADIENT_OPS or (
        node.zero_filled and node.kind == OP and blocking_category(node.op_type) is not None
    )


#: (category, nodes every path must cross, nodes to blame), in order. The second rule: every path crosses a branch or
#: a zero op, and a zero op is on some path; a zero gradient was observed, so the branch taken is the zero op's.
_ZERO_RULES: tuple[tuple[str, Callable[[Node], bool], Callable[[Node], bool]], ...] = (
    ("zero_gradient_op", _zero_op, _zero_op),
    ("zero_gradient_op", lambda n: _zero_op(n) or n.in_branch, _zero_op),
    ("untaken_branch", lambda n: n.in_branch, lambda n: n.in_branch),
    ("dead_activation", lambda n: n.op_type in GATING_ACTIVATIONS, lambda n: n.op_type in GATING_ACTIVATIONS),
)


def zero_hint(analysis: Analysis, keys: set[int], name: str, float16: bool) -> Cause | None:
    """The likely cause if this variable's (present) gradient turns out all-zero, or None.

    O(len(keys)): every table it reads is computed once per analysis.
    """
    if float16:
        return make_cause("underflow", f"`{name}` has a float16 gradient")
    if not keys & analysis.zero_reach:
        return None
    half = _newest(analysis.half_on_path, keys)
    if half is not None:
        return make_cause(
            "underflow",
            f"The gradient of `{name}` flows back through float16 ops ({half.op_type})",
            op=half.op_type,
            location=half.blamed_location(),
        )
    for category, avoiding, culprits in analysis.zero_rules:
        if keys & avoiding or (category == "untaken_branch" and analysis.in_both_branches(keys)):
            continue
        culprit = _newest(culprits, keys)
        if culprit is None and category == "zero_gradient_op":
            continue  # the second rule holds only with a zero op to blame
        if category == "untaken_branch":
            location = culprit.branch_location() if culprit is not None else None
            unclipped, clips = analysis.clipping
            if not keys & unclipped:  # the branch may have run, its gradient zeroed by the clip
                gate = _newest(clips, keys)
                return make_cause(
                    "other",
                    f"Every path from `{name}` to the loss runs inside a tf.cond branch (at {location}) and through "
                    f"a {gate.op_type if gate else 'clip'} (at {gate.blamed_location() if gate else None}): "
                    "the branch may not have run, or that op saturated",
                )
            return make_cause(
                category, f"Every path from `{name}` to the loss runs inside a tf.cond branch", location=location
            )
        op = culprit.op_type if culprit is not None else None
        return make_cause(
            category,
            f"Every path from `{name}` to the loss goes through {op}",
            op=op,
            location=culprit.blamed_location() if culprit is not None else None,
        )
    return None


#: Ops a variable's value passes through unchanged on its way to the op that uses it (Keras's autocast, reads).
_PASS_THROUGH = frozenset({"Identity", "Cast", "ReadVariableOp"})
#: Distinct ReLUs whose witnesses one diagnosis works out at most (one descendants walk each); hints beyond stand.
_MAX_WITNESSED_RELUS = 64


def relu_witnesses(
    analysis: Analysis, hinted: Sequence[tuple[int, set[int]]], hints: dict[int, Cause]
) -> dict[int, ReluCheck]:
    """For each ``dead_activation`` hint (by variable index), the ReLU nearest the variable on its gradient path,
    chained to the next ones towards the loss, each with the variables of ``hinted`` (index, tensor ids) whose
    gradients tell whether it output only zeros (``ReluCheck``, read by ``settle_zero_hints``). One walk per
    distinct ReLU, at most ``_MAX_WITNESSED_RELUS`` (a chain cut there leaves its hint standing): in a chain of
    layers the variables share them."""
    wanted = [(i, keys) for i, keys in hinted if (h := hints.get(i)) is not None and h.category == "dead_activation"]
    if not wanted:
        return {}
    reach = analysis.zero_reach
    nearest = analysis.flow.newest_downstream(
        lambda n: n.op_type in GATING_ACTIVATIONS and any(k in reach for k in n.outputs), oldest=True
    )
    uses = {i: _uses(analysis, keys) for i, keys in hinted}
    checks: dict[int, ReluCheck] = {}
    witnesses: dict[int, ReluCheck] = {}
    for index, keys in wanted:
        chain: list[Node] = []
        relu = _newest(nearest, keys, oldest=True)
        while relu is not None and id(relu) not in checks and len(checks) + len(chain) < _MAX_WITNESSED_RELUS:
            chain.append(relu)
            relu = _newest(nearest, set(relu.outputs), oldest=True)
        after = checks.get(id(relu)) if relu is not None else None
        unchecked = relu is not None and after is None
        for node in reversed(chain):
            after = checks[id(node)] = _relu_check(analysis, node, uses, after, unchecked)
            unchecked = False
        if after is not None:
            witnesses[index] = after
    return witnesses


def _relu_check(
    analysis: Analysis, relu: Node, uses: dict[int, list[Node]], after: ReluCheck | None, unchecked: bool
) -> ReluCheck:
    """One ReLU's witnesses: the variables used between it and the next op that can zero a gradient, those of them
    that multiply its output (zeros kept), and those added to such a product (``ReluCheck``)."""
    flow, forward = analysis.flow, analysis.loss_ancestors

    def ahead(node: Node) -> bool:  # the forward pass only: the backward pass reads every forward tensor too
        return any(out in forward for out in node.outputs)

    def keeps_zeros(node: Node) -> bool:  # Keras's Dropout: where(mask, x * scale, 0) keeps a zero x zero
        if node.op_type in ZERO_KEEPING_OPS:
            return True
        if node.op_type not in SELECT_OPS or len(node.inputs) != 3:
            return False
        other = flow.producer.get(node.inputs[2])
        return other is None or other.op_type in CONSTANT_OPS

    stretch = flow.descendants(relu.outputs, crosses=lambda n: n.op_type not in SATURATING_OPS and ahead(n))
    zeros = flow.descendants(relu.outputs, crosses=lambda n: keeps_zeros(n) and ahead(n))
    used = frozenset(i for i, ops in uses.items() if any(k in stretch for n in ops for k in n.inputs))
    direct = frozenset(
        i
        for i in used
        if len(uses[i]) == 1 and uses[i][0].op_type in MULTIPLYING_OPS and any(k in zeros for k in uses[i][0].inputs)
    )
    products = {out for i in direct for out in uses[i][0].outputs}
    biases = frozenset(
        i for i in used if any(n.op_type in ADDING_OPS and any(k in products for k in n.inputs) for n in uses[i])
    )
    gated = any(
        n.op_type in SATURATING_OPS and any(out in analysis.zero_reach for out in n.outputs)
        for key in stretch
        for n in flow.consumers.get(key, ())
    )
    return ReluCheck(relu.op_type, relu.blamed_location(), direct, biases, used, gated, after, unchecked)


def _uses(analysis: Analysis, keys: set[int]) -> list[Node]:
    """The ops of the forward pass (those the loss is computed from) that use the variable's value (read, then
    through identities and casts); not the backward pass's, which use it too."""
    flow, forward = analysis.flow, analysis.loss_ancestors
    stack = [out for node in flow.readers(keys) for out in node.outputs]
    seen = set(stack)
    found: dict[int, Node] = {}
    while stack:
        for node in flow.consumers.get(stack.pop(), ()):
            if node.kind == LINK or node.op_type in _PASS_THROUGH:
                fresh = [out for out in node.outputs if out not in seen]
                seen.update(fresh)
                stack.extend(fresh)
            elif any(out in forward for out in node.outputs):
                found[id(node)] = node
    return list(found.values())


def _newest(table: dict[int, Node], keys: set[int], oldest: bool = False) -> Node | None:
    """The newest (``oldest``: the oldest) node the table gives for these tensors."""
    found = [table[k] for k in keys if k in table]
    return (min if oldest else max)(found, key=lambda n: n.seq) if found else None


def influences_loss(analysis: Analysis, keys: set[int]) -> bool:
    """Whether a read of the variable in this step feeds the loss."""
    return any(out in analysis.loss_ancestors for n in analysis.step_reads(keys) for out in n.outputs)
