"""Hot/cold split (FAE, Adnan et al., VLDB'22): hot rows exact in a small fp32 table, the rest in
any other representation, with a placement hint for the cost model.

Before: W [rows, d].
After:  H [h, d] fp32: the h most accessed rows (from the access profile, chosen by a coverage
        target or a byte budget), hottest first;
        cold: any representation of the other c = rows - h rows plus one all-zero row (slot c),
        fitted by a nested pass (``cold=quantize:bits=4``) or stored as an fp16 / bf16 / fp32
        table;
        remap [rows] (int16 or int32): remap[i] = hot slot >= 0, or -(cold slot + 1).
        e(bag) = Σ_{i hot} H[slot_i] + cold(bag with hot ids sent to the zero row)
Hot rows are exact (the cold part adds exact zeros for them); mean pooling stays right because
both halves divide by the whole bag's length.  ``placement`` ({"hot": "fast", "cold": "slow"})
is recorded in the spec for the cost model; passes do not place anything themselves.

The nested pass runs unchanged on a site built for the cold sub-table: a model whose table is
the cold table, a profile whose counts are the cold rows' (the zero row gets the hot lookups,
which it serves), and the sample batches with this table's ids remapped to cold slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from passes.row_index import hottest_rows, narrow_tensor
from rewrite.core.batch import Batch
from rewrite.core.embedding import (FusedLookup, Representation, TableBag, pool, register_representation,
                               representation_class)
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, parse_pass, plain_fp32_table, register_pass
from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.core.tracing import EmbeddingSite, capture
from rewrite.core.units import check_bytes_option, parse_bytes

DEFAULT_COVERAGE = 0.9     # share of lookups the hot set covers (the profile CLI's default)
PLAIN_COLD = {"fp32": ("float32", 0.0), "fp16": ("float16", 2.0 ** -11), "bf16": ("bfloat16", 2.0 ** -8)}
SUBNORMAL_SLACK = 2.0 ** -24   # absolute rounding error below fp16's normal range (6.1e-5)


@register_representation("hotcold")
class HotColdBag(Representation):
    def __init__(self, rows: int, dim: int, hot_rows: int, cold: dict, pooling: str = "sum",
                 placement: dict | None = None, remap_dtype: str = "int32", hot_lookup_share: float = 0.0):
        super().__init__()
        self.rows, self.dim, self.pooling, self.hot_rows = int(rows), int(dim), pooling, int(hot_rows)
        self.placement = dict(placement or {"hot": "fast", "cold": "slow"})
        self.hot_lookup_share = float(hot_lookup_share)
        params = {k: v for k, v in cold.items() if k != "kind"}
        self.cold = representation_class(cold["kind"]).from_params(**params)
        if self.cold.rows != self.rows - self.hot_rows + 1 or self.cold.dim != self.dim:
            raise ValueError(f"cold part is {self.cold.rows}x{self.cold.dim}, expected "
                             f"{self.rows - self.hot_rows + 1}x{self.dim} (cold rows + the zero row)")
        if self.cold.pooling != self.pooling:
            raise ValueError(f"cold part pools by {self.cold.pooling}, the table by {self.pooling}")
        self.hot = nn.Parameter(torch.empty(self.hot_rows, self.dim))
        self.register_buffer("remap", torch.empty(self.rows, dtype=getattr(torch, remap_dtype)))

    def forward(self, indices, offsets):
        slot = self.remap.index_select(0, indices).to(torch.int64)
        is_hot = slot >= 0
        hot = self.hot.index_select(0, slot.clamp(min=0)) * is_hot.unsqueeze(1).to(self.hot.dtype)
        cold_ids = torch.where(is_hot, self.cold.rows - 1, -slot - 1)
        return pool(hot, offsets, self.pooling) + self.cold(cold_ids, offsets)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "hot_rows": self.hot_rows, "cold": self.cold.spec(),
                "pooling": self.pooling, "placement": self.placement,
                "remap_dtype": str(self.remap.dtype).removeprefix("torch."),
                "hot_lookup_share": self.hot_lookup_share}

    def num_bytes(self):
        return (self.hot.numel() * 4 + self.remap.numel() * self.remap.element_size()
                + self.cold.num_bytes())

    def bytes_per_lookup(self):
        """Expected at the profiled hot share: the remap entry, then a hot row or a cold lookup
        (the hot row 0 / cold zero row read for the other half stay cached)."""
        share = self.hot_lookup_share
        return float(self.remap.element_size() + share * 4 * self.dim
                     + (1 - share) * self.cold.bytes_per_lookup())

    def flops_per_lookup(self):
        return float(3 * self.dim + self.cold.flops_per_lookup())    # mask, hot pool, final add

    def fused_lookup(self) -> FusedLookup | None:
        """Hot rows (f32) and the cold part's stored rows, one of them per lookup by the remap;
        None when the cold part stores no rows in a standard layout."""
        cold = self.cold.fused_lookup()
        if cold is None or cold.kind != "rows" or cold.project is not None:
            return None
        return FusedLookup("hotcold", self.dim, cold.rows, second=self.hot.detach().contiguous(),
                           remap=self.remap)

    def describe(self):
        return (f"hot-cold {self.rows}x{self.dim}: hot {self.hot_rows} fp32 ({self.placement['hot']}) "
                f"+ cold [{self.cold.describe()}] ({self.placement['cold']})")


@dataclass(frozen=True)
class HotColdConfig(Selection):
    coverage: float | None = option(None, "hot set: the fewest rows covering this share of lookups")
    hot_bytes: str | None = option(None, "...or the rows that fit this fp32 budget, e.g. 256KiB")
    hot_memory: str = option("fast", "placement hint for the cost model")
    cold_memory: str = option("slow", "placement hint for the cost model (cold part)")
    cold: str = option("quantize:bits=8", "cold rows: fp16 | bf16 | fp32 | a nested pass, e.g. quantize:bits=4", rest=True)

    def __post_init__(self):
        if self.coverage is not None and self.hot_bytes is not None:
            raise ValueError("give coverage or hot_bytes, not both")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        check_bytes_option("hot_bytes", self.hot_bytes)
        if not self.hot_memory or not self.cold_memory:
            raise ValueError("hot_memory and cold_memory must be non-empty names")
        if self.cold not in PLAIN_COLD:
            try:
                parse_pass(self.cold)
            except RewriteError as e:
                raise ValueError(f"cold={self.cold}: {e}") from None


def _cold_sample(batches: list[Batch], model, table: str, to_cold: np.ndarray) -> list[Batch]:
    """The sample batches with ``table``'s ids sent through ``to_cold`` (other features as they are)."""
    feats = [f for f, t in enumerate(model.feature_tables) if t == table]
    lut = torch.from_numpy(to_cold)
    out = []
    for b in batches:
        idx = b.indices.clone()
        bounds = b.offsets[:: b.size].tolist()
        for f in feats:
            idx[bounds[f]:bounds[f + 1]] = lut.index_select(0, idx[bounds[f]:bounds[f + 1]])
        out.append(Batch(b.dense, idx, b.offsets, b.labels))
    return out


def run_nested(text: str, site: EmbeddingSite, ctx: PassContext, cold_table: TableBag,
               to_cold: np.ndarray, cold_counts: np.ndarray) -> Rewrite | Skip:
    """Run the pass ``text`` on ``cold_table`` as if it were ``site``'s table (module doc)."""
    nested = parse_pass(text)
    if cold_table.rows < nested.config.min_rows:
        return Skip(f"{cold_table.rows} rows < min_rows={nested.config.min_rows}")
    sub_model = ctx.model.with_tables({site.name: cold_table})
    sub_site = next(s for s in capture(sub_model)[1] if s.name == site.name)
    tables = dict(ctx.profile.tables)
    tables[site.name] = TableProfile(site.name, cold_table.rows, site.dim, cold_counts)
    sub_profile = AccessProfile(tables, ctx.profile.samples, ctx.profile.sample_rate, ctx.profile.source)
    sub_ctx = PassContext(sub_model, sub_profile, _cold_sample(ctx.sample, ctx.model, site.name, to_cold),
                          ctx.seed)
    return nested.info.run(sub_site, nested.config, sub_ctx)


@register_pass("hot-cold", HotColdConfig)
def hot_cold(site: EmbeddingSite, cfg: HotColdConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> hot rows exact in fp32 + cold rows in another representation (FAE)."""
    table = plain_fp32_table(site, ctx, "hot-cold")
    if isinstance(table, Skip):
        return table
    counts = ctx.counts(site.name)
    if counts is None:
        return Skip("hot-cold needs an access profile to choose the hot rows (rewrite profile -o)")
    if cfg.hot_bytes is not None:
        hot = hottest_rows(counts, rows=parse_bytes(cfg.hot_bytes) // (4 * site.dim))
    else:
        hot = hottest_rows(counts, coverage=cfg.coverage if cfg.coverage is not None else DEFAULT_COVERAGE)
    if len(hot) == 0:
        return Skip(f"no hot rows: {cfg.hot_bytes} holds no {4 * site.dim}-byte row" if cfg.hot_bytes
                    else "no hot rows: the profile saw no lookup of this table")
    if len(hot) == site.rows:
        return Skip("every row is hot: nothing left for the cold part")
    is_hot = np.zeros(site.rows, dtype=bool)
    is_hot[hot] = True
    cold_ids = np.flatnonzero(~is_hot)
    n_cold = len(cold_ids)
    to_cold = np.full(site.rows, n_cold, dtype=np.int64)
    to_cold[cold_ids] = np.arange(n_cold)
    weight = table.weight.detach()
    cold_weight = torch.cat([weight[torch.from_numpy(cold_ids)], weight.new_zeros((1, site.dim))])
    bound, notes = None, {}
    if cfg.cold in PLAIN_COLD:
        dtype, unit = PLAIN_COLD[cfg.cold]
        cold = TableBag(n_cold + 1, site.dim, site.pooling, dtype=dtype, weight=cold_weight)
        bound = float(cold_weight.abs().max()) * unit + (SUBNORMAL_SLACK if unit else 0.0)
    else:
        cold_counts = np.append(counts[cold_ids], counts[hot].sum())
        result = run_nested(cfg.cold, site, ctx, TableBag(n_cold + 1, site.dim, site.pooling, weight=cold_weight),
                            to_cold, cold_counts)
        if isinstance(result, Skip):
            return Skip(f"cold pass {cfg.cold} skipped the cold table: {result.reason}")
        cold, bound = result.representation, result.error_bound
        notes["cold_notes"] = dict(result.notes)
    zero_row = cold.dense_rows(torch.tensor([n_cold])).detach()
    notes["cold_zero_row_max_abs"] = float(zero_row.abs().max())
    if notes["cold_zero_row_max_abs"] > 0:
        bound = None            # hot ids pick up the cold part's (inexact) zero row
    slots = np.empty(site.rows, dtype=np.int64)
    slots[hot] = np.arange(len(hot))
    slots[cold_ids] = -np.arange(n_cold) - 1
    remap = narrow_tensor(slots)
    share = float(counts[hot].sum() / max(1, counts.sum()))
    rep = HotColdBag(site.rows, site.dim, len(hot), cold.spec(), site.pooling,
                     {"hot": cfg.hot_memory, "cold": cfg.cold_memory},
                     str(remap.dtype).removeprefix("torch."), share)
    rep.cold.load_state_dict(cold.state_dict())
    with torch.no_grad():
        rep.hot.copy_(weight[torch.from_numpy(hot)])
        rep.remap.copy_(remap)
    if rep.num_bytes() >= table.num_bytes():
        return Skip(f"hot-cold takes {rep.num_bytes()} bytes >= the table's {table.num_bytes()}")
    notes.update({"hot_rows": len(hot), "hot_lookup_share": share, "hot_bytes": len(hot) * 4 * site.dim,
                  "remap_dtype": rep.params()["remap_dtype"], "remap_bytes": remap.numel() * remap.element_size(),
                  "cold_bytes": rep.cold.num_bytes(), "placement": rep.placement})
    return Rewrite(rep, error_bound=bound, notes=notes)
