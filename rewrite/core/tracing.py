"""Capture: the canonical model as a torch.fx graph whose table lookups are visible nodes.

Representations are fx leaves (one ``call_module`` node per feature lookup) and the feature
split is one leaf function, so a pass replaces a table by swapping one submodule and the graph
keeps its shape.  ``EmbeddingSite`` is what passes and the cost model see of one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from rewrite.core.embedding import Representation
from rewrite.core.model import RecModel


@dataclass(frozen=True)
class EmbeddingSite:
    name: str                 # table name, e.g. "t3"
    module_path: str          # "embeddings.t3"
    nodes: tuple[str, ...]    # fx nodes that look it up (one per feature using the table)
    features: tuple[str, ...]
    rows: int
    dim: int
    pooling: str
    representation: str
    bytes: int

    def module(self, model: torch.nn.Module) -> Representation:
        return model.get_submodule(self.module_path)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, Representation) or super().is_leaf_module(m, qualname)


def capture(model: RecModel) -> tuple[fx.GraphModule, list[EmbeddingSite]]:
    """Trace ``model.forward(dense, indices, offsets)``; one site per table, in table order."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name="CapturedDLRM")
    gm.graph.lint()
    users: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Representation):
            users.setdefault(node.target, []).append(node.name)
    sites = []
    for name, rep in model.embeddings.items():
        path = f"embeddings.{name}"
        sites.append(EmbeddingSite(
            name=name, module_path=path, nodes=tuple(users.get(path, ())),
            features=tuple(f for f, t in model.spec.features if t == name),
            rows=rep.rows, dim=rep.dim, pooling=rep.pooling, representation=rep.kind,
            bytes=rep.num_bytes()))
    return gm, sites
