"""An independent re-implementation of facebookresearch/dlrm's ``DLRM_Net`` (dlrm_s_pytorch.py),
written from dlrm's formulas and module layout so its ``state_dict`` has dlrm's exact keys:

    emb_l.{i}.weight                      nn.EmbeddingBag(mode="sum")
    emb_l.{i}.weight_q / .weight_r        QREmbeddingBag: q = (id / c).long() in float32, r = id % c,
                                          pool q-rows and r-rows separately, then mult/add/concat
    emb_l.{i}.embs.weight [.proj.weight]  PrEmbeddingBag: EmbeddingBag + bias-free Linear (absent,
                                          i.e. nn.Identity, when the table's dim is the base dim)
    v_W_l.{i}                             learned per-row pooling weights (--weighted-pooling=learned)
    bot_l.{k}, top_l.{k}                  nn.Sequential, Linear at even k; ReLU after every bottom
                                          layer, ReLU between top layers, Sigmoid after the last

Interaction "dot": T = [x, e_0..], Z = T Tᵀ, Z[:, li, lj] with li/lj built as dlrm builds them
(strict lower triangle, or with the diagonal for --arch-interaction-itself); "cat": [x, e_0, ..].
``forward(dense, lS_o, lS_i)`` takes dlrm's inputs (per-table offsets WITHOUT the final entry)
and returns probabilities, as dlrm does.  Nothing here imports the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class QREmbeddingBag(nn.Module):
    def __init__(self, num_categories: int, embedding_dim: int, num_collisions: int,
                 operation: str = "mult"):
        super().__init__()
        assert operation in ("concat", "mult", "add")
        self.num_collisions, self.operation = num_collisions, operation
        self.weight_q = nn.Parameter(torch.empty(math.ceil(num_categories / num_collisions), embedding_dim))
        self.weight_r = nn.Parameter(torch.empty(num_collisions, embedding_dim))

    def forward(self, input, offsets, per_sample_weights=None):
        input_q = (input / self.num_collisions).long()       # float32 true division, as dlrm
        input_r = torch.remainder(input, self.num_collisions).long()
        embed_q = F.embedding_bag(input_q, self.weight_q, offsets, mode="sum",
                                  per_sample_weights=per_sample_weights)
        embed_r = F.embedding_bag(input_r, self.weight_r, offsets, mode="sum",
                                  per_sample_weights=per_sample_weights)
        if self.operation == "concat":
            return torch.cat((embed_q, embed_r), dim=1)
        if self.operation == "add":
            return embed_q + embed_r
        return embed_q * embed_r


class PrEmbeddingBag(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, base_dim: int):
        super().__init__()
        self.embs = nn.EmbeddingBag(num_embeddings, embedding_dim, mode="sum")
        self.proj = (nn.Linear(embedding_dim, base_dim, bias=False) if embedding_dim < base_dim
                     else nn.Identity())

    def forward(self, input, offsets, per_sample_weights=None):
        return self.proj(self.embs(input, offsets=offsets, per_sample_weights=per_sample_weights))


def _mlp(ln: list[int], sigmoid_layer: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(ln) - 1):
        layers.append(nn.Linear(ln[i], ln[i + 1], bias=True))
        layers.append(nn.Sigmoid() if i == sigmoid_layer else nn.ReLU())
    return nn.Sequential(*layers)


class DLRM_Net(nn.Module):  # noqa: N801 (dlrm's name)
    """dlrm's model.  m_spa: the table width (a list of per-table widths with md_flag)."""

    def __init__(self, m_spa, ln_emb: list[int], ln_bot: list[int], ln_top: list[int],
                 arch_interaction_op: str = "dot", arch_interaction_itself: bool = False,
                 qr_flag: bool = False, qr_operation: str = "mult", qr_collisions: int = 4,
                 qr_threshold: int = 200, md_flag: bool = False, md_threshold: int = 200,
                 weighted_pooling: str | None = None, seed: int = 0):
        super().__init__()
        self.arch_interaction_op = arch_interaction_op
        self.arch_interaction_itself = arch_interaction_itself
        self.emb_l = nn.ModuleList()
        for i, n in enumerate(ln_emb):
            if qr_flag and n > qr_threshold:
                self.emb_l.append(QREmbeddingBag(n, m_spa, qr_collisions, qr_operation))
            elif md_flag and n > md_threshold:
                self.emb_l.append(PrEmbeddingBag(n, m_spa[i], max(m_spa)))
            else:
                self.emb_l.append(nn.EmbeddingBag(n, max(m_spa) if md_flag else m_spa, mode="sum"))
        if weighted_pooling == "learned":
            self.v_W_l = nn.ParameterList([nn.Parameter(torch.ones(n)) for n in ln_emb])
        else:
            self.v_W_l = [None] * len(ln_emb)
        self.bot_l = _mlp(ln_bot, -1)
        self.top_l = _mlp(ln_top, len(ln_top) - 2)
        self.randomize(seed)

    @torch.no_grad()
    def randomize(self, seed: int) -> "DLRM_Net":
        """Tables ~ N(0, 0.5²), weight matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), pooling
        weights 0.5 + |N(0, 0.5²)|: embeddings move the interaction, logits stay O(1)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.startswith("v_W_l"):
                p.copy_(0.5 + 0.5 * noise.abs())
            elif name.startswith("emb_l") and "proj" not in name:
                p.copy_(0.5 * noise)
            elif p.dim() == 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * noise)
        return self

    def apply_emb(self, lS_o, lS_i):
        ly = []
        for k, (idx, off) in enumerate(zip(lS_i, lS_o)):
            w = None if self.v_W_l[k] is None else self.v_W_l[k].gather(0, idx)
            ly.append(self.emb_l[k](idx, off, per_sample_weights=w))
        return ly

    def interact_features(self, x, ly):
        if self.arch_interaction_op == "dot":
            batch_size, d = x.shape
            T = torch.cat([x] + ly, dim=1).view((batch_size, -1, d))
            Z = torch.bmm(T, torch.transpose(T, 1, 2))
            _, ni, nj = Z.shape
            offset = 1 if self.arch_interaction_itself else 0
            li = torch.tensor([i for i in range(ni) for j in range(i + offset)], dtype=torch.long)
            lj = torch.tensor([j for i in range(nj) for j in range(i + offset)], dtype=torch.long)
            return torch.cat([x, Z[:, li, lj]], dim=1)
        if self.arch_interaction_op == "cat":
            return torch.cat([x] + ly, dim=1)
        raise ValueError(self.arch_interaction_op)

    def forward(self, dense_x, lS_o, lS_i):
        """Click probabilities [B, 1], dlrm's output."""
        return self.top_l(self._z(dense_x, lS_o, lS_i))

    def logits(self, dense_x, lS_o, lS_i):
        """The last top layer's pre-sigmoid output, [B]."""
        return self.top_l[:-1](self._z(dense_x, lS_o, lS_i)).squeeze(1)

    def _z(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        return self.interact_features(x, self.apply_emb(lS_o, lS_i))


def dlrm_inputs(batch, n_tables: int):
    """Canonical feature-major batch -> dlrm's (dense, lS_o, lS_i): per-table offsets of length B
    (no final entry), starting at 0, and per-table index tensors."""
    b = batch.dense.shape[0]
    lS_o, lS_i = [], []
    for f in range(n_tables):
        lo, hi = int(batch.offsets[f * b]), int(batch.offsets[(f + 1) * b])
        lS_o.append(batch.offsets[f * b:(f + 1) * b] - lo)
        lS_i.append(batch.indices[lo:hi])
    return batch.dense, lS_o, lS_i


def _metadata(nbatches: int) -> dict:
    """dlrm's --save-model extras: ints, numpy scalars from its metrics, the optimizer's state."""
    return {
        "epoch": 0, "nepochs": 1, "nbatches": nbatches, "nbatches_test": 7,
        "iter": np.int64(nbatches), "train_acc": np.float64(0.781), "train_loss": np.float32(0.462),
        "test_acc": np.float64(0.7893), "test_auc": np.float64(0.7712), "test_loss": np.float64(0.45),
        "total_loss": np.float32(0.0), "total_accu": 0,
    }


def save_like_dlrm(net: DLRM_Net, path: Path, nbatches: int = 1234) -> dict:
    """``torch.save`` the dict ``dlrm_s_pytorch.py --save-model`` writes; returns the metadata."""
    meta = _metadata(nbatches)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.save({"state_dict": net.state_dict(), **meta, "opt_state_dict": opt.state_dict()}, path)
    return meta


def save_bare_state_dict(net: DLRM_Net, path: Path) -> None:
    torch.save(net.state_dict(), path)


def save_data_parallel(net: DLRM_Net, path: Path) -> None:
    """As saved from an nn.DataParallel-wrapped model: every key prefixed ``module.``."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, **_metadata(10)}, path)
