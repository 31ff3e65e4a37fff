"""facebookresearch/dlrm checkpoints (``dlrm_s_pytorch.py --save-model``).

The file is ``{"state_dict": ..., "test_acc": np.float64, ...}`` or a bare state dict.
Keys, by table position i (named ``t{i}``, feature i looks up table i):

    emb_l.{i}.weight                         plain table, sum pooling
    emb_l.{i}.weight_q, emb_l.{i}.weight_r   QR (--qr-flag): op(pool(W_q[i/c]), pool(W_r[i%c]))
    emb_l.{i}.embs.weight [, .proj.weight]   MD (--md-flag): pool(E[i]) Pᵀ
    v_W_l.{i}                                learned pooling weights: refused (not supported)
    bot_l.{k}.weight/bias, top_l.{k}...      Linear at even k; ReLU after every bottom layer,
                                             ReLU between top layers, sigmoid after the last

The interaction ("dot", "dot" with the diagonal, or "cat") is read off the first top layer's
width; where two readings fit, the caller must say which (``interaction=``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from passes.mixed_dim import MDBag
from passes.quotient_remainder import QRBag
from rewrite.core.embedding import Representation, TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.model import ModelSpec, RecModel, interaction_pairs

METADATA_KEYS = ("nepochs", "nbatches", "nbatches_test", "test_acc", "test_auc", "epoch", "iter",
                 "train_loss", "total_loss")
INTERACTIONS = {"dot": ("dot", "dlrm"), "dot-self": ("dot", "dlrm-self"), "cat": ("cat", "dlrm")}


def looks_like_dlrm(state: dict[str, Any]) -> bool:
    return any(k.startswith(("emb_l.", "bot_l.")) for k in state)


def state_dict_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded checkpoint into (state dict with ``module.`` stripped, metadata)."""
    if not isinstance(obj, dict):
        raise RewriteError(f"{path}: expected a dict (a checkpoint or a state dict), "
                           f"found {type(obj).__name__}")
    meta: dict[str, Any] = {}
    state = obj
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
        meta = {k: _plain(obj[k]) for k in METADATA_KEYS if k in obj}
    if not all(isinstance(k, str) for k in state):
        raise RewriteError(f"{path}: not a state dict (its keys are not all parameter names)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, meta


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v if isinstance(v, (int, float, str, bool)) else repr(v)[:80]


def _tensor(state: dict, key: str, path: Path, ndim: int) -> torch.Tensor:
    v = state.get(key)
    if not isinstance(v, torch.Tensor):
        raise RewriteError(f"{path}: key {key!r} is missing or not a tensor")
    if v.dim() != ndim or not v.is_floating_point():
        raise RewriteError(f"{path}: key {key!r} should be a {ndim}-D float tensor, "
                           f"got shape {tuple(v.shape)} {v.dtype}")
    return v.detach().to(torch.float32)


def _linear_stack(state: dict, prefix: str, path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ks = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.weight$", k))})
    if not ks:
        raise RewriteError(f"{path}: no {prefix}.*.weight keys: not a dlrm checkpoint")
    layers = []
    for k in ks:
        w = _tensor(state, f"{prefix}.{k}.weight", path, 2)
        b = _tensor(state, f"{prefix}.{k}.bias", path, 1)
        if b.shape[0] != w.shape[0]:
            raise RewriteError(f"{path}: {prefix}.{k}.bias has {b.shape[0]} entries, weight has {w.shape[0]} rows")
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise RewriteError(f"{path}: {prefix}.{k}.weight expects {w.shape[1]} inputs but the "
                               f"previous layer gives {layers[-1][0].shape[0]}")
        layers.append((w, b))
    return layers


def _table(state: dict, i: int, path: Path, d: int, qr_rows: int | None, qr_op: str | None
           ) -> Representation:
    p = f"emb_l.{i}"
    if f"v_W_l.{i}" in state and state[f"v_W_l.{i}"] is not None:
        raise RewriteError(f"{path}: table {i} uses learned pooling weights (v_W_l.{i}, "
                           f"--weighted-pooling=learned), which dlrm-rewrite does not support yet")
    if f"{p}.weight" in state:
        w = _tensor(state, f"{p}.weight", path, 2)
        return TableBag(w.shape[0], w.shape[1], weight=w)
    if f"{p}.weight_q" in state:
        wq = _tensor(state, f"{p}.weight_q", path, 2)
        wr = _tensor(state, f"{p}.weight_r", path, 2)
        c = wr.shape[0]
        rows = qr_rows or wq.shape[0] * c
        if -(-rows // c) != wq.shape[0]:
            raise RewriteError(f"{path}: table {i}: {rows} rows with {c} collisions need "
                               f"{-(-rows // c)} quotient rows, the file has {wq.shape[0]}")
        if wq.shape[1] != wr.shape[1]:
            raise RewriteError(f"{path}: table {i}: weight_q and weight_r widths differ")
        # dlrm's concat halves each part's width; mult and add cannot be told apart from shapes
        op = qr_op or ("concat" if 2 * wq.shape[1] == d else "mult")
        dim = 2 * wq.shape[1] if op == "concat" else wq.shape[1]
        rep = QRBag(rows, dim, c, op=op, pool_first=True, float_quotient=True)
        rep.weight_q.data, rep.weight_r.data = wq, wr
        return rep
    if f"{p}.embs.weight" in state:
        e = _tensor(state, f"{p}.embs.weight", path, 2)
        proj = state.get(f"{p}.proj.weight")
        if proj is None:
            return TableBag(e.shape[0], e.shape[1], weight=e)
        proj = _tensor(state, f"{p}.proj.weight", path, 2)
        if proj.shape[1] != e.shape[1]:
            raise RewriteError(f"{path}: table {i}: proj.weight is {tuple(proj.shape)}, "
                               f"embs.weight has width {e.shape[1]}")
        rep = MDBag(e.shape[0], proj.shape[0], e.shape[1])
        rep.weight.data, rep.proj.data = e, proj
        return rep
    raise RewriteError(f"{path}: table {i} has none of emb_l.{i}.weight, .weight_q, .embs.weight")


def read(obj: Any, path: Path, interaction: str | None = None, qr_op: str | None = None,
         qr_rows: dict[int, int] | None = None) -> RecModel:
    """Build the canonical model from a loaded dlrm checkpoint.

    interaction: "dot", "dot-self" or "cat" where the widths cannot tell; qr_op: dlrm's
    --qr-operation, not stored in the file (default: concat when the parts are half the width,
    else mult, dlrm's default); qr_rows: true row counts of QR tables by position
    (the file stores only ceil(rows/c) quotient rows; default rows = quotient rows * c).
    """
    state, meta = state_dict_of(obj, path)
    n_tables = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"emb_l\.(\d+)\.", k))), default=-1)
    if n_tables == 0:
        raise RewriteError(f"{path}: no emb_l.* keys: not a dlrm checkpoint")
    if qr_op not in (None, "mult", "add", "concat"):
        raise RewriteError(f"unknown QR operation {qr_op!r} (mult, add, concat)")
    bottom, top = _linear_stack(state, "bot_l", path), _linear_stack(state, "top_l", path)
    d = bottom[-1][0].shape[0]
    tables = {f"t{i}": _table(state, i, path, d, (qr_rows or {}).get(i), qr_op)
              for i in range(n_tables)}
    dims = [t.dim for t in tables.values()]
    width = top[0][0].shape[1]
    n = n_tables + 1
    readings = {"dot": d + len(interaction_pairs(n, "dlrm")),
                "dot-self": d + len(interaction_pairs(n, "dlrm-self")),
                "cat": d + sum(dims)}
    fits = [k for k, w in readings.items() if w == width]
    if interaction is not None:
        if interaction not in readings:
            raise RewriteError(f"unknown interaction {interaction!r} (dot, dot-self, cat)")
        if readings[interaction] != width:
            raise RewriteError(f"{path}: interaction {interaction} gives {readings[interaction]} "
                               f"features but the first top layer takes {width}")
        fits = [interaction]
    if not fits:
        raise RewriteError(f"{path}: the first top layer takes {width} inputs; dot would give "
                           f"{readings['dot']}, dot with self-interaction {readings['dot-self']}, "
                           f"cat {readings['cat']}")
    if len(fits) > 1:
        raise RewriteError(f"{path}: widths fit both {' and '.join(fits)}; say which with --interaction")
    kind, pairs = INTERACTIONS[fits[0]]
    if kind == "dot" and any(x != d for x in dims):
        raise RewriteError(f"{path}: dot interaction needs every table of width {d} "
                           f"(the bottom MLP's output), got {sorted(set(dims))}")
    if top[-1][0].shape[0] != 1:
        raise RewriteError(f"{path}: the last top layer has {top[-1][0].shape[0]} outputs, expected 1")
    spec = ModelSpec(
        n_dense=bottom[0][0].shape[1],
        bottom=tuple(w.shape[0] for w, _ in bottom), top=tuple(w.shape[0] for w, _ in top),
        features=tuple((f"f{i}", f"t{i}") for i in range(n_tables)),
        interaction=kind, pairs=pairs,
        provenance={"format": "dlrm", "metadata": meta},
    )
    model = RecModel(spec, tables)
    for seq, layers in ((model.bottom, bottom), (model.top, top)):
        linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
        for lin, (w, b) in zip(linears, layers):
            lin.weight.data, lin.bias.data = w, b
    return model.eval()


def write(model: RecModel, path: Path | str, metadata: dict[str, Any] | None = None) -> None:
    """Save a plain-table model the way ``dlrm_s_pytorch.py --save-model`` does (atomically):
    ``{"state_dict": ..., <metadata as numpy scalars>}``, keys emb_l/bot_l/top_l."""
    from rewrite.core.atomic import atomic_path

    state: dict[str, torch.Tensor] = {}
    for i, (name, rep) in enumerate(model.embeddings.items()):
        if not isinstance(rep, TableBag) or rep.weight.dtype != torch.float32:
            raise RewriteError(f"table {name} is {rep.describe()}; dlrm's format holds fp32 tables "
                               f"(save rewritten models in the native format)")
        state[f"emb_l.{i}.weight"] = rep.weight.detach().clone()
    for prefix, seq in (("bot_l", model.bottom), ("top_l", model.top)):
        for k, m in enumerate(seq):
            if isinstance(m, torch.nn.Linear):
                state[f"{prefix}.{k}.weight"] = m.weight.detach().clone()
                state[f"{prefix}.{k}.bias"] = m.bias.detach().clone()
    blob: dict[str, Any] = {"state_dict": state}
    for k, v in (metadata or {}).items():
        blob[k] = np.float64(v) if isinstance(v, float) else np.int64(v)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
