"""Imports go one way: core <- passes, targets <- driver (``docs/design.md``).

Every ``import`` in ``rewrite/``, ``passes/`` and ``targets/`` is read from the source (module
level and inside functions alike); a back-edge fails with the importing file and line.  Within a
layer, module-level imports must form no cycle.  Run it alone: ``pytest tests/test_layers.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rewrite", "passes", "targets")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None                                     # third-party or stdlib
    if module == "rewrite.core" or module.startswith("rewrite.core."):
        return "core"
    return {"rewrite": "driver", "passes": "passes", "targets": "targets"}[top]


ALLOWED = {"core": {"core"}, "passes": {"core", "passes"}, "targets": {"core", "targets"},
           "driver": {"core", "passes", "targets", "driver"}}


def sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


MODULES = {module_name(p) for p in sources()}


def imports(path: Path):
    """(imported module, line, at module level) for each import in ``path``; ``from p import m``
    counts as importing the submodule ``p.m`` where there is one."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                yield (sub if sub in MODULES else node.module), node.lineno, id(node) in top


def test_no_layer_imports_one_above_it():
    back_edges = []
    for path in sources():
        src = layer(module_name(path))
        for target, line, _ in imports(path):
            dst = layer(target)
            if target == "rewrite":                       # the package's lazy facade is the driver's
                dst = "driver"
            if dst and dst not in ALLOWED[src]:
                back_edges.append(f"{path.relative_to(ROOT)}:{line} ({src}) imports {target} ({dst})")
    assert not back_edges, "imports must go core <- passes, targets <- driver:\n" + "\n".join(back_edges)


def test_module_level_imports_form_no_cycle():
    graph = nx.DiGraph()
    for path in sources():
        src = module_name(path)
        for target, _, at_top in imports(path):
            if at_top and target in MODULES and target != src and not src.startswith(target + "."):
                graph.add_edge(src, target)        # (a module importing its own package: not a cycle)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])
