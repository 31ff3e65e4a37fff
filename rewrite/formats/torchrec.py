"""TorchRec ``torchrec.models.dlrm.DLRM`` and ``DLRM_DCN`` state dicts -> the canonical model.

Keys (after a wrapper prefix such as ``model.`` from ``DLRMTrain`` or ``module.`` from DDP):

    sparse_arch.embedding_bag_collection.embedding_bags.{table}.weight   [rows, D]
    dense_arch.model._mlp.{j}._linear.{weight,bias}        ReLU after every layer, the last too
    over_arch.model.0._mlp.{j}._linear.{weight,bias}       ReLU after each
    over_arch.model.1.{weight,bias}                        final Linear -> logits (no sigmoid)
    inter_arch.crossnet.{W_kernels,V_kernels,bias}.{l}     DLRM_DCN only: W [N, r], V [r, N],
                                                           bias [N] (or [N, 1], older TorchRec)

DLRM's InteractionArch: T = [x, e_0..e_{F-1}] (B, F+1, D); Z = T Tᵀ; it keeps
``Z[:, triu_indices(F+1, F+1, offset=1)]`` (i < j, row-major) and returns [x, those] ->
``ModelSpec(pairs="torchrec")``.  DLRM_DCN's InteractionDCNArch returns
``LowRankCrossNet(reshape(T, (B, (F+1)·D)))``, whose width (F+1)·D the over arch takes ->
``interaction="dcn"``.

What a state dict cannot say, and the defaults used (override with arguments of ``read``):
pooling (``sum``, EmbeddingBagConfig's default); which features look up which table (one feature
per table, named after the table without a leading ``t_``: TorchRec's dlrm_main names tables
``t_{feature}``); table order (the state dict's order; in DCP directories, whose key order
depends on which rank saved what, tables are ordered by name with numbers compared as numbers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.model import ModelSpec, RecModel, interaction_pairs

TABLES = "sparse_arch.embedding_bag_collection.embedding_bags."
DENSE = "dense_arch.model._mlp."
OVER_MLP = "over_arch.model.0._mlp."
OVER_LAST = "over_arch.model.1."
CROSS = "inter_arch.crossnet."
ANCHOR = DENSE + "0._linear.weight"
KNOWN_PREFIXES = ("module.", "model.", "_dmp_wrapped_module.")


def model_prefix(state: Mapping[str, Any]) -> str | None:
    """The wrapper prefix in front of the DLRM's own keys ("" for a bare DLRM), or None."""
    found = sorted((k[: -len(ANCHOR)] for k in state if k.endswith(ANCHOR)), key=len)
    return found[0] if found else None


def looks_like_torchrec(state: Mapping[str, Any]) -> bool:
    return model_prefix(state) is not None


def natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: t_cat_2 < t_cat_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _tensor(state: Mapping[str, Any], key: str, path: Path, ndim: int | tuple[int, ...]) -> torch.Tensor:
    v = state.get(key)
    if not isinstance(v, torch.Tensor):
        raise RewriteError(f"{path}: key {key!r} is missing or not a tensor")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if v.dim() not in ndims or not v.is_floating_point():
        raise RewriteError(f"{path}: key {key!r} should be a {' or '.join(map(str, ndims))}-D float "
                           f"tensor, got shape {tuple(v.shape)} {v.dtype}")
    return v.detach().to(torch.float32)


def _mlp(state: Mapping[str, Any], prefix: str, path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    js = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}(\d+)\._linear\.weight$", k))})
    if js != list(range(len(js))):
        raise RewriteError(f"{path}: layers of {prefix}* are not numbered 0..{len(js) - 1} (found {js})")
    return [_linear(state, f"{prefix}{j}._linear.", path) for j in js]


def _linear(state: Mapping[str, Any], prefix: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    w = _tensor(state, prefix + "weight", path, 2)
    b = _tensor(state, prefix + "bias", path, 1)
    if b.shape[0] != w.shape[0]:
        raise RewriteError(f"{path}: {prefix}bias has {b.shape[0]} entries, weight has {w.shape[0]} rows")
    return w, b


def _chain(layers: list[tuple[torch.Tensor, torch.Tensor]], width: int, what: str, path: Path) -> None:
    for k, (w, _) in enumerate(layers):
        if w.shape[1] != width:
            raise RewriteError(f"{path}: {what} layer {k} takes {w.shape[1]} inputs but gets {width}")
        width = w.shape[0]


def _crossnet(state: Mapping[str, Any], width: int, path: Path) -> tuple[torch.Tensor, ...]:
    ls = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{CROSS}W_kernels\.(\d+)$", k))})
    if ls != list(range(len(ls))):
        raise RewriteError(f"{path}: {CROSS}W_kernels.* are not numbered 0..{len(ls) - 1} (found {ls})")
    ws, vs, bs = [], [], []
    for layer in ls:
        w = _tensor(state, f"{CROSS}W_kernels.{layer}", path, 2)
        v = _tensor(state, f"{CROSS}V_kernels.{layer}", path, 2)
        b = _tensor(state, f"{CROSS}bias.{layer}", path, (1, 2)).reshape(-1)
        rank = w.shape[1]
        if w.shape != (width, rank) or v.shape != (rank, width) or b.shape != (width,):
            raise RewriteError(f"{path}: cross layer {layer}: W {tuple(w.shape)}, V {tuple(v.shape)}, "
                               f"bias {tuple(b.shape)} do not fit width {width} (expected W [N, r], "
                               f"V [r, N], bias [N] with N = (F+1)·D = {width})")
        if ws and rank != ws[0].shape[1]:
            raise RewriteError(f"{path}: cross layers have different ranks ({ws[0].shape[1]}, {rank})")
        ws.append(w), vs.append(v), bs.append(b)
    return torch.stack(ws), torch.stack(vs), torch.stack(bs)


def _features(tables: list[str], features: Sequence[tuple[str, str]] | None, path: Path
              ) -> tuple[tuple[str, str], ...]:
    if features is None:
        return tuple((t[2:] if t.startswith("t_") and len(t) > 2 else t, t) for t in tables)
    out = tuple((str(f), str(t)) for f, t in features)
    unknown = sorted({t for _, t in out} - set(tables))
    if unknown:
        raise RewriteError(f"{path}: features name table(s) {', '.join(unknown)} that the checkpoint "
                           f"does not have (tables: {', '.join(tables)})")
    unused = [t for t in tables if t not in {t for _, t in out}]
    if unused:
        raise RewriteError(f"{path}: no feature looks up table(s) {', '.join(unused)}; "
                           f"list every feature of the trained model")
    return out


def read(state: Mapping[str, Any], path: Path, *, features: Sequence[tuple[str, str]] | None = None,
         pooling: str | Mapping[str, str] = "sum", table_order: str = "state",
         provenance: Mapping[str, Any] | None = None) -> RecModel:
    """Build the canonical model from a TorchRec DLRM / DLRM_DCN state dict.

    features: (feature, table) pairs in the model's input order (TorchRec's SparseArch orders
    features by table, then by the table's ``feature_names``); default one per table.
    pooling: "sum" | "mean", for all tables or per table name.  table_order: "state" (the
    state dict's order, which is the EmbeddingBagCollection's) or "natural" (by name).
    Keys outside the model prefix (optimizer state, counters) are ignored and counted.
    """
    prefix = model_prefix(state)
    if prefix is None:
        raise RewriteError(f"{path}: no {ANCHOR} key: not a TorchRec DLRM state dict")
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = len(state) - len(own)
    table_names = [k[len(TABLES):-len(".weight")] for k in own
                   if k.startswith(TABLES) and k.endswith(".weight")]
    if not table_names:
        raise RewriteError(f"{path}: no {prefix}{TABLES}*.weight keys: the model has no tables")
    if table_order == "natural":
        table_names.sort(key=natural_key)
    elif table_order != "state":
        raise RewriteError(f"unknown table order {table_order!r} (state, natural)")
    recognised = re.compile(rf"({re.escape(TABLES)}[^.]+\.weight|{re.escape(DENSE)}\d+\._linear\.(weight|bias)|"
                            rf"{re.escape(OVER_MLP)}\d+\._linear\.(weight|bias)|{re.escape(OVER_LAST)}(weight|bias)|"
                            rf"{re.escape(CROSS)}(W_kernels|V_kernels|bias)\.\d+)$")
    unknown = [k for k in own if not recognised.match(k)]
    if unknown:
        hint = (" (DLRM_Projection's interaction branches are not supported)"
                if any(k.startswith("inter_arch.interaction_branch") for k in unknown) else "")
        raise RewriteError(f"{path}: keys this reader does not know: {', '.join(prefix + k for k in unknown[:3])}"
                           f"{' ...' if len(unknown) > 3 else ''}{hint}")

    modes = {t: pooling if isinstance(pooling, str) else pooling.get(t, "sum") for t in table_names}
    bad = sorted({m for m in modes.values()} - {"sum", "mean"})
    if bad:
        raise RewriteError(f"unknown pooling {bad[0]!r} (sum, mean)")
    weights = {t: _tensor(own, f"{TABLES}{t}.weight", path, 2) for t in table_names}
    dims = sorted({w.shape[1] for w in weights.values()})
    if len(dims) != 1:
        raise RewriteError(f"{path}: TorchRec's DLRM needs one embedding width, tables have {dims}")
    d = dims[0]
    bottom = _mlp(own, DENSE, path)
    _chain(bottom, bottom[0][0].shape[1], "dense_arch", path)
    if bottom[-1][0].shape[0] != d:
        raise RewriteError(f"{path}: dense_arch ends at width {bottom[-1][0].shape[0]}, tables have {d}")
    over = _mlp(own, OVER_MLP, path) + [_linear(own, OVER_LAST, path)]
    if over[-1][0].shape[0] != 1:
        raise RewriteError(f"{path}: over_arch.model.1 has {over[-1][0].shape[0]} outputs, expected 1 (logits)")
    feats = _features(table_names, features, path)
    n_vec = len(feats) + 1
    is_dcn = any(k.startswith(CROSS) for k in own)
    width = n_vec * d if is_dcn else d + len(interaction_pairs(n_vec, "torchrec"))
    _chain(over, width, "over_arch", path)
    cross = _crossnet(own, width, path) if is_dcn else None
    spec = ModelSpec(
        n_dense=bottom[0][0].shape[1], bottom=tuple(w.shape[0] for w, _ in bottom),
        top=tuple(w.shape[0] for w, _ in over), features=feats,
        interaction="dcn" if is_dcn else "dot", pairs="torchrec",
        cross_layers=0 if cross is None else cross[0].shape[0],
        cross_rank=0 if cross is None else cross[0].shape[2],
        provenance={"format": "torchrec", "model": "DLRM_DCN" if is_dcn else "DLRM",
                    "key_prefix": prefix, "ignored_keys": ignored, **(provenance or {})},
    )
    tables = {t: TableBag(w.shape[0], d, pooling=modes[t], weight=w) for t, w in weights.items()}
    model = RecModel(spec, tables)
    for seq, layers in ((model.bottom, bottom), (model.top, over)):
        linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
        for lin, (w, b) in zip(linears, layers, strict=True):
            lin.weight.data, lin.bias.data = w, b
    if cross is not None:
        model.interaction.W.data, model.interaction.V.data, model.interaction.bias.data = cross
    return model.eval()
