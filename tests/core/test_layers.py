"""The package's import structure: layers, and no import cycle, lazy (function-level) imports included.

Read from the source with ``ast``: every ``import`` and ``from ... import`` of a gradtel module anywhere in a file
(module level or inside a function) is an edge; imports under ``if TYPE_CHECKING:`` are left out (they never run).
The layers are written down in the README's architecture section.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gradtel"

#: Bottom to top. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS: list[tuple[str, ...]] = [
    # names, tables and process facts, no TensorFlow and no OpenTelemetry
    (
        "gradtel.version",
        "gradtel.metrics",
        "gradtel.vocabulary",
        "gradtel.statistics",
        "gradtel.logonce",
        "gradtel.layout",
        "gradtel.naming",
        "gradtel.identity",
        "gradtel.phases",
        "gradtel.assets",
        "gradtel.history",
    ),
    # the in-graph statistics; the diagnosis of missing gradients
    ("gradtel.stats", "gradtel.diagnosis"),
    # one optimizer's tables, its steps recorded, its missing gradients reported, its records read
    ("gradtel.tables", "gradtel.records", "gradtel.recording", "gradtel.missing", "gradtel.handle"),
    # settings and series selection; tables for people
    ("gradtel.series", "gradtel.config", "gradtel.render", "gradtel.htmlreport"),
    # the process's handles and diagnoser
    ("gradtel.registry",),
    # readers and the endpoint
    ("gradtel.exposition", "gradtel.producer", "gradtel.endpoint"),
    # the export; the SDK exporter plug-in
    ("gradtel.export", "gradtel.prometheus_plugin"),
    # patching optimizers; the report
    ("gradtel.instrumenting", "gradtel.reporting"),
    # zero-code instrumentation and callbacks; the package's public face
    ("gradtel.auto", "gradtel.instrumentor", "gradtel.callback", "gradtel.keras", "gradtel.tf_keras", "gradtel"),
    # programs
    ("gradtel.runner", "gradtel.demo", "gradtel.localstack", "gradtel.cli", "gradtel._bootstrap"),
]


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def imports(module: str) -> set[str]:
    """The gradtel modules ``module`` imports anywhere in its file (``from gradtel import x``: ``gradtel.x`` when
    that is a module, else the package itself)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_blocks(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gradtel")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] != "gradtel":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    found.discard(module)
    return found


def layer_of(module: str) -> int:
    """The layer of ``module``: that of its longest listed prefix (``gradtel.diagnosis.walker``: diagnosis's)."""
    best = None
    for index, layer in enumerate(LAYERS):
        for name in layer:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's architecture)"
    return best[0]


def test_every_module_is_in_a_layer_and_imports_none_above_it():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module in sorted(MODULES)
        for target in sorted(imports(module))
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_lazy_imports_included():
    graph = {module: imports(module) for module in MODULES}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_lazy_imports_and_skips_type_checking_ones():
    """The checks above would pass on an empty graph: these known edges prove the reader finds them."""
    assert "gradtel.export" in imports("gradtel.instrumenting")  # a function-level import
    assert "gradtel.registry" in imports("gradtel.export")  # a module-level one
    assert "gradtel.diagnosis" in imports("gradtel.registry")  # lazy, and a package
    assert "gradtel.producer" not in imports("gradtel.exposition")  # only under TYPE_CHECKING
    assert layer_of("gradtel.diagnosis.tape_hook") == layer_of("gradtel.diagnosis")
