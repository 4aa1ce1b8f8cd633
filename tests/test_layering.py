"""The package's layers import downwards only: no import cycle between saving, model, compression
and checkpoint, visible or hidden inside a function.

The graph is read from the source (``ast``), not from ``sys.modules``: an edge is every
``import`` of a ``refusal_core`` module anywhere in a module, at its top or inside a function
(a function-level import runs as soon as the function does, so it is as much a dependency as a
top-level one and can hide a cycle that only shows when the import is hoisted). Imports under
``if TYPE_CHECKING:`` never run and are left out. Importing ``a.b.c`` also runs the packages
``a.b`` and ``a`` (their ``__init__``), so it counts as an edge to each of them, except to a
package that contains the importing module (Python has started running it already).

Lazy imports of heavy or optional third-party packages (transformers, bitsandbytes,
llmcompressor, vllm, matplotlib, lm_eval, gguf, jinja2) are fine and stay where they are: they
are not ``refusal_core`` modules and never enter the graph. Likewise the command line's lazy
imports of the library (``refusal_core.cli`` keeps ``--help`` fast) are edges from the top
layer downwards, which the rule allows.

The layers, lowest first (a module may import its own layer and any lower one):

===============  ==============================================================================
layer            modules
===============  ==============================================================================
``saving``       ``refusal_core.saving``: atomic files, records, artifacts, stages, checkpoint record
``model``        ``refusal_core.model``: layout, inputs, identity, loading (incl. checkpoints,
                 rebuilding refusal_core's simulated modules)
``compression``  ``refusal_core.compression``: the method table and every method
``checkpoint``   ``refusal_core.checkpoint``: writing a model as a Hugging Face directory
===============  ==============================================================================
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import pytest

import refusal_core

PACKAGE_ROOT = Path(refusal_core.__file__).parent
PACKAGE = "refusal_core"

#: (layer name, module prefix), lowest layer first.
LAYERS: tuple[tuple[str, str], ...] = (
    ("saving", "refusal_core.saving"),
    ("model", "refusal_core.model"),
    ("compression", "refusal_core.compression"),
    ("checkpoint", "refusal_core.checkpoint"),
)


def _module_names(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _imported(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: Iterable[str]
) -> list[str]:
    """The ``refusal_core`` modules an import statement names (``from pkg import sub`` names ``pkg.sub``)."""
    known = set(known)
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, *([node.module] if node.module else [])])
        else:
            prefix = node.module or ""
        targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    out = []
    for target in targets:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target.startswith(PACKAGE + ".") and target in known:
            out.append(target)
    return out


@cache
def import_graph() -> Mapping[str, frozenset[str]]:
    """``{module: modules whose import it runs}`` over the installed ``refusal_core`` source."""
    modules = _module_names(PACKAGE_ROOT)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skipped = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            for target in _imported(module, is_package, node, modules):
                parents = [target.rsplit(".", k)[0] for k in range(1, target.count("."))]
                for t in (target, *parents):
                    if t != module and not module.startswith(t + ".") and t != PACKAGE:
                        graph[module].add(t)
    return {m: frozenset(ts) for m, ts in graph.items()}


def layer_of(module: str) -> int | None:
    for i, (_, prefix) in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def _reachable(graph: Mapping[str, frozenset[str]], start: str) -> dict[str, str]:
    """Every module reachable from ``start``, each with the module that first imports it."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        m = stack.pop()
        for t in sorted(graph[m]):
            if t not in seen and t != start:
                seen[t] = m
                stack.append(t)
    return seen


def _path(via: Mapping[str, str], start: str, end: str) -> list[str]:
    out = [end]
    while out[-1] != start:
        out.append(via[out[-1]])
    return out[::-1]


def cycles(graph: Mapping[str, frozenset[str]], nodes: Iterable[str]) -> list[list[str]]:
    """The strongly connected components of more than one module among ``nodes`` (Tarjan)."""
    nodes = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & nodes):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "refusal_core.model" in graph["refusal_core.cli"], (
        "the CLI imports refusal_core.model inside its command functions only; the graph missed it"
    )
    assert "refusal_core.study.run" in graph["refusal_core.study"], (
        "refusal_core.study imports its run module inside __getattr__; the graph missed it"
    )


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_a_layer_reaches_no_higher_layer(layer: str) -> None:
    graph = import_graph()
    level = [name for name, _ in LAYERS].index(layer)
    offences = []
    for module in sorted(m for m in graph if layer_of(m) == level):
        via = _reachable(graph, module)
        for target in sorted(via):
            target_level = layer_of(target)
            if target_level is not None and target_level > level:
                offences.append(" -> ".join(_path(via, module, target)))
    assert not offences, (
        f"layer {layer!r} imports a higher layer (directly, through another module, or inside a "
        f"function); {len(offences)} path(s), e.g.:\n  " + "\n  ".join(offences[:8])
    )


def test_no_import_cycle_inside_the_named_layers() -> None:
    graph = import_graph()
    found = cycles(graph, (m for m in graph if layer_of(m) is not None))
    assert not found, "import cycles among saving/model/compression/checkpoint modules:\n  " + "\n  ".join(
        " <-> ".join(c) for c in found
    )


#: The one cycle left in the package, outside the named layers: ``refusal_core.study`` re-exports
#: ``run_study`` (and two helpers) from its ``run`` module on first use (``__getattr__``), and that
#: module is built on :mod:`refusal_core.bench`, which reads the study's config, results and
#: schemas. Importing ``refusal_core.study`` therefore never runs the bench, and the import paths
#: the README and the tests use keep working.
KNOWN_CYCLES = [["refusal_core.bench", "refusal_core.study", "refusal_core.study.run"]]


def test_no_new_import_cycle_anywhere_in_the_package() -> None:
    graph = import_graph()
    found = cycles(graph, graph)
    assert found == KNOWN_CYCLES, (
        "import cycles in refusal_core (beside the documented one):\n  "
        + "\n  ".join(" <-> ".join(c) for c in found if c not in KNOWN_CYCLES)
    )
