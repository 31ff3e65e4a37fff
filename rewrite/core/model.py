"""The canonical DLRM every reader produces and every pass and target consumes.

    x      = bottom_mlp(dense)                       ReLU after every bottom layer (dlrm, TorchRec)
    e_f    = table_of(f)(bag f)                      one representation per table, [B, d]
    z      = interaction(x, e_0 .. e_{F-1})          "dot": [x, <t_i, t_j> for (i, j) in pairs]
                                                     "cat": [x, e_0, ..., e_{F-1}]
                                                     "dcn": x_L of a low-rank cross net (DCN v2)
                                                       x_0 = [x, e_0, ..., e_{F-1}]  [B, N]
                                                       x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l
                                                       W_l [N, r], V_l [r, N], b_l [N] (TorchRec)
    logits = top_mlp(z)                              ReLU between top layers, none after the last

Batch convention (FBGEMM table-batched style): ``indices`` int64 [N], all features' lookups
concatenated feature-major; ``offsets`` int64 [F*B + 1]; bag (f, b) is
``indices[offsets[f*B+b] : offsets[f*B+b+1]]``.  ``forward`` returns logits [B].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from rewrite.core.embedding import Representation, representation_class

SPEC_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts a state dict alone cannot say; tables themselves live in the modules."""

    n_dense: int
    bottom: tuple[int, ...]            # layer widths after the input, e.g. (512, 256, 64, 16)
    top: tuple[int, ...]               # layer widths after the interaction, last is 1
    features: tuple[tuple[str, str], ...]   # (feature name, table name), in input order
    interaction: str = "dot"           # "dot" | "cat" | "dcn"
    pairs: str = "dlrm"                # "dlrm": strict lower triangle i>j row-major;
                                       # "dlrm-self": with diagonal; "torchrec": upper, i<j
    cross_layers: int = 0              # "dcn": number of cross layers L
    cross_rank: int = 0                # "dcn": low rank r of W_l V_l
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.interaction not in ("dot", "cat", "dcn"):
            raise ValueError(f"unknown interaction {self.interaction!r} (dot, cat, dcn)")
        if self.pairs not in ("dlrm", "dlrm-self", "torchrec"):
            raise ValueError(f"unknown interaction pair order {self.pairs!r}")
        if not self.features:
            raise ValueError("a model needs at least one categorical feature")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = [list(f) for f in self.features]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(
            n_dense=int(d["n_dense"]), bottom=tuple(d["bottom"]), top=tuple(d["top"]),
            features=tuple((str(a), str(b)) for a, b in d["features"]),
            interaction=d.get("interaction", "dot"), pairs=d.get("pairs", "dlrm"),
            cross_layers=int(d.get("cross_layers", 0)), cross_rank=int(d.get("cross_rank", 0)),
            provenance=dict(d.get("provenance", {})),
        )


def interaction_pairs(n_vectors: int, order: str) -> list[tuple[int, int]]:
    """The (i, j) entries of Z = T Tᵀ an interaction keeps, in output order."""
    if order == "dlrm":
        return [(i, j) for i in range(n_vectors) for j in range(i)]
    if order == "dlrm-self":
        return [(i, j) for i in range(n_vectors) for j in range(i + 1)]
    if order == "torchrec":
        return [(i, j) for i in range(n_vectors) for j in range(i + 1, n_vectors)]
    raise ValueError(f"unknown interaction pair order {order!r}")


def mlp(widths: list[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if relu_last or k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DotInteraction(nn.Module):
    """[x, <t_i, t_j> for kept pairs] with T = [x, e_0..e_{F-1}]: one bmm and one gather."""

    def __init__(self, n_vectors: int, order: str):
        super().__init__()
        flat = [i * n_vectors + j for i, j in interaction_pairs(n_vectors, order)]
        self.register_buffer("flat_pairs", torch.tensor(flat, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        t = torch.stack([x, *embeddings], dim=1)
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        return torch.cat([x, z.index_select(1, self.flat_pairs)], dim=1)


class CatInteraction(nn.Module):
    def forward(self, x: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x, *embeddings], dim=1)


class DCNInteraction(nn.Module):
    """Low-rank cross net over x_0 = [x, e_0..e_{F-1}]: x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l.

    V_l is applied first (TorchRec's LowRankCrossNet: linear(linear(x_l, V_l), W_l)); output [B, N].
    Parameters stacked over layers: W [L, N, r], V [L, r, N], bias [L, N].  Matmuls and
    elementwise ops only; the layer loop unrolls when traced.
    """

    def __init__(self, width: int, layers: int, rank: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(layers, width, rank))
        self.V = nn.Parameter(torch.empty(layers, rank, width))
        self.bias = nn.Parameter(torch.empty(layers, width))
        self.layers = layers

    def forward(self, x: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        x0 = torch.cat([x, *embeddings], dim=1)
        xl = x0
        for layer in range(self.layers):
            low = torch.matmul(xl, self.V[layer].t())
            xl = x0 * (torch.matmul(low, self.W[layer].t()) + self.bias[layer]) + xl
        return xl


def interaction_width(spec: ModelSpec, dims: list[int]) -> int:
    if spec.interaction == "dot":
        return spec.bottom[-1] + len(interaction_pairs(len(spec.features) + 1, spec.pairs))
    return spec.bottom[-1] + sum(dims)  # "cat" and "dcn" (the cross net keeps its input width)


@torch.fx.wrap
def split_bags(indices: torch.Tensor, offsets: torch.Tensor, n_features: int):
    """Feature-major canonical bags -> per feature (indices_f, offsets_f starting at 0).

    Views, not copies, except the F small offset subtractions.  An fx leaf: captured graphs show
    one split node feeding one lookup node per feature.
    """
    batch = (offsets.numel() - 1) // n_features
    if batch == 0:
        empty = indices[:0]
        return tuple(t for _ in range(n_features) for t in (empty, offsets[:1]))
    bounds = offsets[::batch].tolist()
    out = []
    for f in range(n_features):
        lo, hi = bounds[f], bounds[f + 1]
        out.append(indices[lo:hi])
        out.append(offsets[f * batch:(f + 1) * batch + 1] - lo)
    return tuple(out)


class RecModel(nn.Module):
    """Canonical DLRM: ``forward(dense, indices, offsets) -> logits [B]``."""

    def __init__(self, spec: ModelSpec, tables: dict[str, Representation]):
        super().__init__()
        self.spec = spec
        self.embeddings = nn.ModuleDict(tables)
        dims = [tables[t].dim for _, t in spec.features]
        self.bottom = mlp([spec.n_dense, *spec.bottom], relu_last=True)
        self.top = mlp([interaction_width(spec, dims), *spec.top], relu_last=False)
        if spec.interaction == "dot":
            self.interaction: nn.Module = DotInteraction(len(spec.features) + 1, spec.pairs)
        elif spec.interaction == "dcn":
            self.interaction = DCNInteraction(spec.bottom[-1] + sum(dims), spec.cross_layers,
                                              spec.cross_rank)
        else:
            self.interaction = CatInteraction()

    @property
    def feature_tables(self) -> list[str]:
        return [t for _, t in self.spec.features]

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor):
        bags = split_bags(indices, offsets, len(self.spec.features))
        return self.forward_bags(dense, [bags[i] for i in range(2 * len(self.spec.features))])

    def forward_bags(self, dense: torch.Tensor, bags: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits from per-feature bags [indices_0, offsets_0, indices_1, offsets_1, ...]
        (each offsets_f starts at 0): the form targets export, one input pair per feature."""
        embs = [self.embeddings[t](bags[2 * f], bags[2 * f + 1])
                for f, t in enumerate(self.feature_tables)]
        return self.forward_pooled(dense, embs)

    def forward_pooled(self, dense: torch.Tensor, embs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits from each feature's pooled embeddings [B, d_f] (the part after the lookups)."""
        return self.top(self.interaction(self.bottom(dense), list(embs))).squeeze(1)

    @torch.no_grad()
    def predict(self, dense, indices, offsets) -> torch.Tensor:
        return torch.sigmoid(self(dense, indices, offsets))

    def tables_json(self) -> list[dict[str, Any]]:
        return [{"name": name, **rep.spec()} for name, rep in self.embeddings.items()]

    def full_spec(self) -> dict[str, Any]:
        """The versioned JSON written into native files: architecture plus every table's params."""
        return {"version": SPEC_VERSION, "model": self.spec.to_json(), "tables": self.tables_json()}

    def embedding_bytes(self) -> int:
        return sum(rep.num_bytes() for rep in self.embeddings.values())

    def dense_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in (self.bottom, self.interaction, self.top)
                   for p in m.state_dict().values())

    def with_tables(self, tables: dict[str, Representation]) -> "RecModel":
        """A new model sharing the MLPs and the interaction, with some tables replaced."""
        new = RecModel(self.spec, {**dict(self.embeddings), **tables})
        new.bottom, new.interaction, new.top = self.bottom, self.interaction, self.top
        return new.eval()


def model_from_spec(full: dict[str, Any]) -> RecModel:
    """Empty RecModel of the right shapes from a native spec (then ``load_state_dict``)."""
    spec = ModelSpec.from_json(full["model"])
    tables = {}
    for t in full["tables"]:
        params = {k: v for k, v in t.items() if k not in ("name", "kind")}
        tables[t["name"]] = representation_class(t["kind"]).from_params(**params)
    return RecModel(spec, tables)
