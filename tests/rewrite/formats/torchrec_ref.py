"""An independent plain-torch re-implementation of TorchRec's DLRM and DLRM_DCN (no torchrec).

Module names mirror TorchRec's, so ``state_dict()`` has exactly the keys a TorchRec model
writes (``sparse_arch.embedding_bag_collection.embedding_bags.{t}.weight``,
``dense_arch.model._mlp.{j}._linear.*``, ``over_arch.model.{0._mlp.{j}._linear,1}.*``,
``inter_arch.crossnet.{W_kernels,V_kernels,bias}.{l}``).  The forward follows TorchRec's
source (torchrec/models/dlrm.py, torchrec/modules/crossnet.py): ``nn.EmbeddingBag`` lookups,
T = cat(dense, sparse) (B, F+1, D), bmm, ``triu_indices(F+1, F+1, offset=1)`` gather, or a
low-rank cross net x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l.  It shares no code with
``rewrite``; tests compare the two.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Perceptron(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self._linear = nn.Linear(a, b)

    def forward(self, x):
        return torch.relu(self._linear(x))


class MLP(nn.Module):
    def __init__(self, a: int, sizes: list[int]):
        super().__init__()
        self._mlp = nn.Sequential(*[Perceptron(i, o) for i, o in zip([a, *sizes[:-1]], sizes)])

    def forward(self, x):
        return self._mlp(x)


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


class LowRankCrossNet(nn.Module):
    def __init__(self, n: int, layers: int, rank: int, bias_2d: bool = False):
        super().__init__()
        self.W_kernels = nn.ParameterList([nn.Parameter(torch.randn(n, rank) / n ** 0.5) for _ in range(layers)])
        self.V_kernels = nn.ParameterList([nn.Parameter(torch.randn(rank, n) / n ** 0.5) for _ in range(layers)])
        shape = (n, 1) if bias_2d else (n,)
        self.bias = nn.ParameterList([nn.Parameter(0.1 * torch.randn(shape)) for _ in range(layers)])

    def forward(self, x0):
        xl = x0
        for w, v, b in zip(self.W_kernels, self.V_kernels, self.bias):
            xl = x0 * (nn.functional.linear(nn.functional.linear(xl, v), w) + b.reshape(-1)) + xl
        return xl


class RefDLRM(nn.Module):
    """TorchRec's DLRM (``dcn_layers=0``) or DLRM_DCN, fed canonical feature-major bags."""

    def __init__(self, tables: dict[str, int], dim: int, n_dense: int, dense_sizes: list[int],
                 over_sizes: list[int], dcn_layers: int = 0, dcn_rank: int = 0,
                 features: list[tuple[str, str]] | None = None, mode: str = "sum",
                 bias_2d: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        bags = nn.ModuleDict({t: nn.EmbeddingBag(r, dim, mode=mode) for t, r in tables.items()})
        for bag in bags.values():
            nn.init.normal_(bag.weight, std=0.3)
        self.sparse_arch = Holder(embedding_bag_collection=Holder(embedding_bags=bags))
        self.dense_arch = Holder(model=MLP(n_dense, dense_sizes))
        self.features = features or [(t, t) for t in tables]
        n_vec = len(self.features) + 1
        self.dcn = dcn_layers > 0
        if self.dcn:
            self.inter_arch = Holder(crossnet=LowRankCrossNet(n_vec * dim, dcn_layers, dcn_rank, bias_2d))
            over_in = n_vec * dim
        else:
            over_in = dim + n_vec * (n_vec - 1) // 2
            self.register_buffer("triu", torch.triu_indices(n_vec, n_vec, offset=1), persistent=False)
        self.over_arch = Holder(model=nn.Sequential(MLP(over_in, over_sizes[:-1]),
                                                    nn.Linear(over_sizes[-2], over_sizes[-1])))

    def forward(self, dense, indices, offsets):
        batch = dense.shape[0]
        x = self.dense_arch.model(dense)
        bags = self.sparse_arch.embedding_bag_collection.embedding_bags
        pooled = []
        for f, (_, table) in enumerate(self.features):
            lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
            pooled.append(bags[table](indices[lo:hi], offsets[f * batch:(f + 1) * batch] - lo))
        t = torch.cat([x.unsqueeze(1), torch.stack(pooled, 1)], dim=1)
        if self.dcn:
            z = self.inter_arch.crossnet(t.reshape(batch, -1))
        else:
            inter = torch.bmm(t, t.transpose(1, 2))
            z = torch.cat([x, inter[:, self.triu[0], self.triu[1]]], dim=1)
        return self.over_arch.model(z).squeeze(1)


class DLRMTrain(nn.Module):
    """TorchRec's training wrapper: keys gain a ``model.`` prefix."""

    def __init__(self, dlrm: RefDLRM):
        super().__init__()
        self.model = dlrm
        self.loss_fn = nn.BCEWithLogitsLoss()


def criteo_like(n_tables: int = 5, seed: int = 0) -> dict[str, int]:
    rows = np.random.default_rng(seed).integers(3, 60, n_tables)
    return {f"t_cat_{i}": int(r) for i, r in enumerate(rows)}
