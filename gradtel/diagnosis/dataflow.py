"""One abstract dataflow graph for both execution modes, and the reachability questions asked of it.

Graph mode fills it from a FuncGraph at trace time (graph_source.py), eager mode from an op callback
(eager_recorder.py); the walker (classify.py) only ever sees this. Tensors are identified by TensorFlow's
unique tensor ids (``tensor._id``, never reused), so nothing here keeps a tensor or its contents alive.

Variable state is made explicit: an assignment produces a pseudo tensor and every later read of the same
handle consumes it, so a value that reaches the loss only through ``Variable.assign`` shows as a path
through the assign op.

Ops that read only their input's shape (``tf.shape``, ``tf.zeros_like``...) keep no edge from that input: their
output does not depend on its values. Graph mode often folds them into constants anyway (a static shape), eager
mode never does; without this rule the same program would be "cut by ZerosLike" in one mode and "not on the
loss path" in the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradtel.diagnosis.op_rules import ASSIGN_OPS, READ_OPS, SHAPE_ONLY_OPS

if TYPE_CHECKING:
    from gradtel.diagnosis.layer_sites import LayerSite

#: Node kinds: a real op, a synthetic edge into/out of a function body, or an op whose gradient is
#: user code that the walker cannot see into (its gradient may be None even though it is registered).
OP, LINK, FUNCTION, CUSTOM_GRADIENT = "op", "link", "function", "custom_gradient"

Where = str | Callable[[], str | None] | None


@dataclass(eq=False, slots=True)
class Node:
    """One op (or synthetic link) with its input/output tensor ids and where the user created it."""

    op_type: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    seq: int
    in_ok: tuple[bool, ...]
    out_ok: tuple[bool, ...]
    where: Where = None
    kind: str = OP
    label: str | None = None
    branch: Where = None
    in_branch: bool = False
    #: Graph mode, inside a cond's branch: (that cond, the branch's index), to tell one branch from the other.
    branch_of: tuple[int, int] | None = None
    half: bool = False  # an output is float16: gradients through it can underflow without loss scaling
    zero_filled: bool = False  # in a cond branch or loop body: a None gradient through it becomes zeros
    #: Where the user created (or connected) the library layer that made this op, when a library model ran that
    #: layer (a ``layer_sites.LayerSite``, or a callable that makes it); None otherwise.
    site: LayerSite | Callable[[], LayerSite | None] | None = None

    def location(self) -> str | None:
        """The user's ``file:line`` for this op, resolved on first use (tracebacks are costly)."""
        if callable(self.where):
            self.where = self.where()
        return self.where

    def blamed_location(self) -> str | None:
        """Where to point when this op itself is the culprit (it cuts or zeroes the gradient): its layer's line
        when a library model ran that layer (every op of a model traced by ``fit`` has the ``fit`` line), else
        ``location``. An op run before the tape keeps the line that ran the model: that is the fix."""
        site = self._layer_site()
        return site.line if site is not None else self.location()

    def read_location(self) -> str | None:
        """Where to point for a read: the line that ran the model when the user called it (``model(x)``, where an
        output is dropped), its layer's line when a library ran it (``fit``: the ``fit`` line tells nothing)."""
        site = self._layer_site()
        return site.line if site is not None and site.by_library else self.location()

    def _layer_site(self) -> LayerSite | None:
        if callable(self.site):
            self.site = self.site()
        return self.site

    def branch_location(self) -> str | None:
        """Where the tf.cond whose branch holds this op was written."""
        if callable(self.branch):
            self.branch = self.branch()
        return self.branch


@dataclass(frozen=True, slots=True)
class Crossing:
    """A tensor crossing the TensorFlow boundary: copied out (``.numpy()``) or created from a NumPy value."""

    tensor: int
    seq: int
    location: str | None
    #: An import from a NumPy value (not a Python float): evidence on its own that a value came back from NumPy.
    numpy: bool = True
    #: The Python number that crossed: a scalar copied out (``float(t)``, ``t.numpy()`` of a scalar) or a Python
    #: float brought in; None for an array. A Python float in the loss is evidence of a round trip only where it
    #: is a copied value (``0.5 * loss`` also brings one in).
    value: float | None = None
    #: The shape of the NumPy value that crossed (``()`` for a number): an array that comes back with the copy's
    #: leading (batch) dimension may be NumPy maths on it; one of another shape (a reward, a target) shows nothing.
    shape: tuple[int, ...] = ()
    #: A tensor turned into a Python bool (an eager ``if`` on it): it decides Python control flow, no value comes back.
    decision: bool = False


class DataflowGraph:
    """Ops and tensors of one step (graph mode) or of the recorded eager steps."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.producer: dict[int, Node] = {}
        self.consumers: dict[int, list[Node]] = {}
        self.escapes: list[Crossing] = []
        self.imports: list[Crossing] = []
        self._state: dict[int, int] = {}
        self._next_pseudo = -1

    def __len__(self) -> int:
        return len(self.nodes)

    def add(self, node: Node) -> None:
        """Add an op; a later producer of a tensor replaces an earlier one, as on the tape."""
        if node.op_type in SHAPE_ONLY_OPS:
            node.inputs, node.in_ok = (), ()
        elif node.op_type in ASSIGN_OPS and node.inputs:
            self._as_state_write(node)
        elif node.op_type in READ_OPS and node.inputs and node.inputs[0] in self._state:
            node.inputs = (*node.inputs, self._state[node.inputs[0]])
            node.in_ok = (*node.in_ok, True)
        self.nodes.append(node)
        for out in node.outputs:
            self.producer[out] = node
        for key in set(node.inputs):
            self.consumers.setdefault(key, []).append(node)

    def _as_state_write(self, node: Node) -> None:
        """Rewrite an assignment as value (and previous state, for assign_add/sub and the partial writes of a
        scatter or a slice) -> new pseudo state."""
        handle = node.inputs[0]
        state = self._next_pseudo
        self._next_pseudo -= 1
        inputs, in_ok = list(node.inputs[1:]), list(node.in_ok[1:])
        previous = self._state.get(handle)
        if previous is not None and node.op_type != "AssignVariableOp":
            inputs.append(previous)
            in_ok.append(True)
        node.inputs, node.in_ok = tuple(inputs), tuple(in_ok)
        node.outputs, node.out_ok = (state,), (True,)
        self._state[handle] = state

    def value_of(self, key: int) -> int:
        """The tensor holding ``key``'s value: a variable handle's latest written state, else ``key`` itself."""
        return self._state.get(key, key)

    def add_escape(self, crossing: Crossing) -> None:
        """Note that a tensor's value left TensorFlow."""
        self.escapes.append(crossing)

    def add_import(self, crossing: Crossing) -> None:
        """Note that a tensor was created from a NumPy value."""
        self.imports.append(crossing)

    def live_consumers(self, key: int) -> Iterable[tuple[Node, int]]:
        """(node, output) pairs for each output of each consumer of ``key`` that it still produces."""
        for node in self.consumers.get(key, ()):
            for out in node.outputs:
                if self.producer.get(out) is node:
                    yield node, out

    def readers(self, keys: Iterable[int]) -> list[Node]:
        """Ops that consume one of these (handle) tensors and produce a value."""
        found: list[Node] = []
        for key in keys:
            found.extend(node for node in self.consumers.get(key, ()) if node.outputs)
        return found

    def descendants(
        self, keys: Iterable[int], stop: set[int] | None = None, crosses: Callable[[Node], bool] | None = None
    ) -> set[int]:
        """Every tensor computed from these tensors, over all edges (not beyond the tensors in ``stop``, which are
        included but not followed; only through nodes ``crosses`` accepts)."""
        seen = set(keys)
        stack = list(seen)
        while stack:
            key = stack.pop()
            if stop is not None and key in stop:
                continue
            for node, out in self.live_consumers(key):
                if crosses is not None and not crosses(node):
                    continue
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
        return seen

    def ancestors(self, keys: Iterable[int], crosses: Callable[[Node], bool] | None = None) -> set[int]:
        """Every tensor these tensors were computed from, over all edges (only through nodes ``crosses`` accepts)."""
        start = set(keys)
        seen = set(start)
        stack = list(seen)
        while stack:
            key = stack.pop()
            node = self.producer.get(key)
            if node is None:
                continue
            if crosses is not None and not crosses(node):
                if key not in start:  # made only by a node not crossed: not an ancestor through allowed edges
                    seen.discard(key)
                continue
            for key in node.inputs:
                if key not in seen:
                    seen.add(key)
                    stack.append(key)
        return seen

    def gradient_ancestors(self, keys: Iterable[int], passes: Callable[[Node], bool]) -> set[int]:
        """Every tensor a gradient from these tensors reaches, crossing only nodes for which ``passes``
        holds and only inputs whose dtype can carry a gradient."""
        seen = set(keys)
        stack = list(seen)
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or not passes(node):
                continue
            for key, ok in zip(node.inputs, node.in_ok, strict=True):
                if ok and key not in seen:
                    seen.add(key)
                    stack.append(key)
        return seen

    def newest_downstream(self, selected: Callable[[Node], bool], oldest: bool = False) -> dict[int, Node]:
        """For every tensor, the newest selected node computed from it (over live edges), in ONE pass; ``oldest``:
        the oldest one instead (in a chain of layers, the nearest to the tensor).

        Nodes are visited newest first, so a node's outputs are settled before its inputs; a loop's back edge
        (a While body feeding its own inputs) is the one edge this order misses, which only costs a hint.
        The diagnosis of N variables asks this once instead of walking the graph once per variable.
        """

        def better(node: Node, than: Node | None) -> bool:
            return than is None or (node.seq < than.seq if oldest else node.seq > than.seq)

        best: dict[int, Node] = {}
        for node in reversed(self.nodes):
            found = node if selected(node) else None
            for out in node.outputs:
                later = best.get(out)
                if later is not None and self.producer.get(out) is node and better(later, found):
                    found = later
            if found is None:
                continue
            for key in node.inputs:
                if better(found, best.get(key)):
                    best[key] = found
        return best

    def trim(self, max_nodes: int) -> None:
        """Keep only the newest half of ``max_nodes`` nodes once there are more than ``max_nodes``."""
        if len(self.nodes) <= max_nodes:
            return
        keep = self.nodes[-(max_nodes // 2) :]
        self.nodes, self.producer, self.consumers = [], {}, {}
        for node in keep:
            self.nodes.append(node)
            for out in node.outputs:
                self.producer[out] = node
            for key in set(node.inputs):
                self.consumers.setdefault(key, []).append(node)
        oldest = keep[0].seq if keep else 0
        self.escapes = [e for e in self.escapes if e.seq >= oldest]
        self.imports = [e for e in self.imports if e.seq >= oldest]
