"""MP-Rec's hybrid embedding: a small table part plus a Deep Hash Embedding part, summed.

Before: W [rows, d], e(bag) = Σ_{x in bag} W[x].
After:  e(x) = T[g(x)] + DHE(x),   T [slots, d],  g(x) = ((a·(x mod p) + b) mod p) mod slots
        e(bag) = Σ_{x in bag} e(x)
Fit, in two closed steps: T[s] = Σ_{g(x)=s} w_x W[x] / Σ_{g(x)=s} w_x (the frequency-weighted
least-squares table part: in each slot the hottest ids dominate, so hot rows are kept nearly
exactly without storing an id -> slot map, which would cost 4–8 bytes per row and cap the
compression at 8–16× for d = 16); then the DHE is fitted to the residual W[x] − T[g(x)].

Why a sum and not MP-Rec's concatenation: the interaction needs one [B, d] vector per feature.
Concatenating [T[g(x)], DHE(x)] and projecting with P = [P_1 P_2] gives P_1 T[g(x)] + P_2 DHE(x);
P_1 folds into the rows of T and P_2 into the DHE's last linear layer, so the projection adds
FLOPs and bytes but no expressive power.  The sum is that form with the projection folded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from passes.dhe import MAX_BUCKETS, MIN_HIDDEN, DeepHashDecoder, fit_decoder, plan_decoder, smallest_decoder_bytes
from passes.universal_hash import hash_coefficients, hash_ops, universal_hash
from passes.rowfit import (FitOptions, budget_bytes, fit_steps, fp32_table, not_smaller, over_budget, table_rows,
                           target_compression, weighted_rel_error)
from rewrite.core.embedding import Representation, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Skip, option, register_pass
from rewrite.core.tracing import EmbeddingSite


@register_representation("hybrid")
class HybridBag(Representation):
    def __init__(self, rows: int, dim: int, slots: int, k: int, hidden: tuple[int, ...] | list[int],
                 buckets: int = 1_000_000, transform: str = "uniform", seed: int = 0,
                 pooling: str = "sum"):
        super().__init__()
        self.rows, self.dim, self.pooling, self.seed = int(rows), int(dim), pooling, int(seed)
        self.slots = int(slots)
        self.weight = nn.Parameter(torch.zeros(self.slots, self.dim))
        a, b = hash_coefficients(1, self.seed + 7919)      # independent of the decoder's hashes
        self.register_buffer("slot_a", a)
        self.register_buffer("slot_b", b)
        self.decoder = DeepHashDecoder(self.dim, k, buckets, tuple(hidden), transform, self.seed)

    def slot(self, ids: torch.Tensor) -> torch.Tensor:
        return universal_hash(ids, self.slot_a, self.slot_b, self.slots).squeeze(1)

    def forward(self, indices, offsets):
        rows = self.weight.index_select(0, self.slot(indices)) + self.decoder(indices)
        return pool(rows, offsets, self.pooling)

    def params(self):
        d = self.decoder
        return {"rows": self.rows, "dim": self.dim, "slots": self.slots, "k": d.k,
                "hidden": list(d.hidden), "buckets": d.buckets, "transform": d.transform,
                "seed": self.seed, "pooling": self.pooling}

    def bytes_per_lookup(self):
        return float(self.dim * 4 + self.decoder.weight_bytes())

    def flops_per_lookup(self):
        return float(hash_ops(1)) + self.dim + self.decoder.flops() + self.dim

    def describe(self):
        d = self.decoder
        return (f"hybrid {self.rows}x{self.dim}: table {self.slots} slots + dhe k={d.k} "
                f"{'-'.join(map(str, d.hidden))}")


def fit_slot_table(rep: HybridBag, target: torch.Tensor, weights: np.ndarray) -> None:
    """T[s] = weighted mean of the rows hashing to s (0 for empty slots): the exact
    weighted-least-squares fit of the table part alone."""
    slots = rep.slot(torch.arange(rep.rows, dtype=torch.int64))
    w = torch.as_tensor(weights, dtype=torch.float64)
    num = torch.zeros(rep.slots, rep.dim, dtype=torch.float64)
    num.index_add_(0, slots, w.unsqueeze(1) * target.to(torch.float64))
    den = torch.zeros(rep.slots, dtype=torch.float64).index_add_(0, slots, w)
    with torch.no_grad():
        rep.weight.copy_((num / den.clamp(min=1e-30).unsqueeze(1)).to(torch.float32))


@dataclass(frozen=True)
class HybridConfig(FitOptions):
    compression: float | None = option(None, "total budget = table bytes / compression; default 8 unless "
                                             "slots, k or hidden is given")
    table_share: float = option(0.5, "share of the budget for the table part (rest: DHE)")
    slots: int | None = option(None, "table-part rows: an explicit shape instead of compression (4096)")
    k: int | None = option(None, "DHE part's hashes: an explicit shape (64)")
    hidden: tuple[int, ...] = option((), "DHE part's hidden widths: an explicit shape (32,16)")
    buckets: int = option(1_000_000, "m: hash range (paper: 10^6)")
    transform: Literal["uniform", "gaussian"] = option("uniform", "hash code -> real code: uniform in [-1, 1] or Gaussian (Box-Muller)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.table_share < 1:
            raise ValueError(f"table_share must be in (0, 1), got {self.table_share}")
        if any(v is not None and v < 1 for v in (self.slots, self.k)) or any(h < 1 for h in self.hidden):
            raise ValueError("slots, k and hidden widths must be >= 1")
        if self.compression is not None and self.shape_given:
            raise ValueError("give compression or an explicit shape (slots, k, hidden), not both")
        if not 2 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be in [2, {MAX_BUCKETS}], got {self.buckets}")

    @property
    def shape_given(self) -> bool:
        return self.slots is not None or self.k is not None or bool(self.hidden)


EXPLICIT_DEFAULTS = (4096, 64, (32, 16))   # slots, k, hidden when only part of a shape is given


def plan_hybrid(rows: int, dim: int, cfg: HybridConfig) -> tuple[int, int, tuple[int, ...]] | None:
    """(slots, k, hidden) from the config's shape, or from the byte budget (``compression``, by
    default 8); None when the budget cannot hold one slot and the smallest decoder."""
    ratio = target_compression(cfg, cfg.shape_given)
    if ratio is None:
        slots, k, hidden = EXPLICIT_DEFAULTS
        return cfg.slots or slots, cfg.k or k, cfg.hidden or hidden
    budget = budget_bytes(rows, dim, ratio)
    slots = max(1, int(budget * cfg.table_share) // (dim * 4))
    planned = plan_decoder(dim, budget - slots * dim * 4 - 16)
    if planned is None:      # give the decoder its smallest form, the slots what is left
        slots = (budget - 16 - smallest_decoder_bytes(dim)) // (dim * 4)
        planned = plan_decoder(dim, budget - slots * dim * 4 - 16) if slots >= 1 else None
    if planned is None:
        return None
    return slots, planned[0], planned[1]


def smallest_hybrid_bytes(dim: int) -> int:
    return dim * 4 + 16 + smallest_decoder_bytes(dim)


@register_pass("hybrid", HybridConfig)
def hybrid(site: EmbeddingSite, cfg: HybridConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 table -> hashed table part + DHE part (MP-Rec hybrid, summed), fitted by frequency."""
    table = fp32_table(site, ctx, "hybrid")
    if isinstance(table, Skip):
        return table
    planned = plan_hybrid(site.rows, site.dim, cfg)
    if planned is None:
        return over_budget("hybrid", smallest_hybrid_bytes(site.dim), target_compression(cfg, False),
                           table, f"1 slot + dhe k={2 * MIN_HIDDEN}, hidden {MIN_HIDDEN}-{MIN_HIDDEN // 2}")
    slots, k, hidden = planned
    rep = HybridBag(site.rows, site.dim, slots, k, hidden, cfg.buckets, cfg.transform, cfg.seed,
                    site.pooling)
    skip = not_smaller("hybrid", rep.num_bytes(), table)
    if skip:
        return skip
    weights = ctx.row_weights(site.name, site.rows)
    target = table.weight.detach()
    fit_slot_table(rep, target, weights)
    residual = target - rep.weight.detach().index_select(0, rep.slot(torch.arange(site.rows)))
    rep.train()
    steps = fit_steps(cfg, site.rows)
    fit_decoder(rep.decoder, residual, weights, steps, cfg.batch_size, cfg.lr, cfg.seed,
                desc=f"hybrid {site.name}")
    rep.eval()
    w = torch.as_tensor(weights, dtype=torch.float32)
    return Rewrite(rep, notes={"slots": slots, "k": k, "hidden": list(hidden), "steps": steps,
                               "table_part_rel_error": weighted_rel_error(target - residual, target, w),
                               "fit_weighted_rel_error": weighted_rel_error(table_rows(rep, site.rows), target, w)})

