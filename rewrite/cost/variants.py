"""Enumerate variants per table and measure their quality.

Before: a model, the passes registered at run time (``rewrite.core.pass_contract.PASSES``), a grid of
settings per pass (``GRID``, a plain data table), sample batches (labelled or not).
After: per table a list of ``Variant``s: "keep" plus every (pass setting, placeable tier) the pass
accepted and verified, each with its exact bytes, its cost facts (``estimate.rep_facts``), its
measured relative embedding error and, with labels, its measured AUC drop

    auc_drop(t, v) = max(0, AUC(model) - AUC(model with only table t replaced by v))

on the sample (clamped at 0: a noisy "improvement" must not buy another table's loss).  One
``pipeline.apply`` per setting rewrites every table at once (each table is verified against its
own original, so per-table errors do not depend on the other tables); AUC then needs one
evaluation of the model per variant.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from rewrite.core.batch import Batch
from rewrite.cost.estimate import TableStats, coverage_curve, rep_facts
from rewrite.cost.types import HardwareSpec, Variant
from rewrite.core.embedding import Representation
from rewrite.core.errors import RewriteError
from rewrite.core.metrics import auc
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import ConfiguredPass, parse_pass
from rewrite.pass_manager import apply
from rewrite.core.access_profile import AccessProfile

# Settings tried per pass: the text after "NAME:" in ``-p NAME:...`` ("" = the pass's defaults).
# A registered pass missing here is tried with its defaults; an entry whose options the pass does
# not have is reported and skipped.  Edit this table (or pass --grid FILE) as passes evolve.
GRID: dict[str, tuple[str, ...]] = {
    "quantize": ("bits=8", "bits=4", "bits=2"),
    "qr": ("collisions=4", "collisions=16", "collisions=64"),
    "md": ("",),
    "mdq": ("", "compression=16", "compression=32", "bits=8:energy=1", "bits=2:energy=1"),
    "hash": ("",),
    "tt": ("",),
    "prune-dims": ("",),
    "hot-cold": ("",),
    "dhe": ("",),
    "hybrid": ("",),
    "memrec": ("",),
    "robe": ("",),
    "onehot": ("",),
}


def spelled(spec: str | None) -> str:
    """A pass spec with the options ``GRID`` varies written out even at their defaults, so two
    settings of one pass never look alike: ``quantize`` -> ``quantize:bits=8`` beside
    ``quantize:bits=4``; ``None`` (the table as it is) -> ``keep``."""
    if not spec or spec == "keep":
        return "keep"
    try:
        cp = parse_pass(spec)
    except RewriteError:
        return spec
    parts = str(cp).split(":")
    given = {part.split("=", 1)[0] for part in parts[1:]}
    varied = sorted({opt.split("=", 1)[0] for entry in GRID.get(cp.name, ()) for opt in entry.split(":") if "=" in opt})
    extra = [f"{k}={getattr(cp.config, k)}" for k in varied if k not in given and hasattr(cp.config, k)]
    return ":".join([parts[0], *extra, *parts[1:]])


@dataclass
class Enumeration:
    """Variants per table, the representation behind each variant key, and what was skipped."""

    variants: dict[str, list[Variant]]
    reps: dict[str, Representation]
    skipped: list[dict[str, str]] = field(default_factory=list)
    auc_base: float | None = None
    labelled: bool = False


def grid_passes(grid: dict[str, tuple[str, ...]] | None = None) -> tuple[list[ConfiguredPass], list[dict]]:
    """Every pass of the grid x its settings, parsed; entries that do not parse (or name a pass
    that is not registered) are reported, not fatal."""

    grid = GRID if grid is None else grid
    out, skipped = [], []
    for name in sorted(grid):
        for opts in grid[name]:
            text = f"{name}:{opts}" if opts else name
            try:
                out.append(parse_pass(text))
            except RewriteError as e:
                skipped.append({"table": "*", "pass": text, "reason": f"grid entry does not parse: {e}"})
    return out, skipped


def table_stats(model: RecModel, profile: AccessProfile | None, sample: list[Batch]) -> dict[str, TableStats]:
    """Pooling factor and cache share from the sample; hot-row coverage from the profile."""
    lookups = {t: 0.0 for t in model.embeddings}
    bags = {t: 0.0 for t in model.embeddings}
    n_feat = len(model.spec.features)
    for b in sample:
        for f, ids in enumerate(b.feature_ids(n_feat)):
            t = model.feature_tables[f]
            lookups[t] += ids.numel()
            bags[t] += b.size
    total = sum(lookups.values()) or 1.0
    out = {}
    for t in model.embeddings:
        counts = profile.counts(t) if profile is not None and t in profile.tables else None
        out[t] = TableStats(lookups_per_bag=lookups[t] / bags[t] if bags[t] else 1.0,
                            cache_share=lookups[t] / total, coverage=coverage_curve(counts))
    return out


@torch.no_grad()
def _logits(model: RecModel, sample: list[Batch]) -> np.ndarray:
    return np.concatenate([model(*b.inputs()).numpy() for b in sample])


def variant_of(table: str, pass_spec: str | None, rep: Representation, tier: str,
               rel_error: float = 0.0, auc_drop: float = 0.0, quality_source: str = "measured") -> Variant:
    return Variant(table, pass_spec, rep.describe(), tier, rep.num_bytes(), rep_facts(rep),
                   float(rel_error), float(max(0.0, auc_drop)), quality_source)


def enumerate_variants(model: RecModel, hw: HardwareSpec, sample: list[Batch],
                       profile: AccessProfile | None = None, grid=None,
                       progress: bool = True, keep_degraded: bool = False) -> Enumeration:
    """Keep + every accepted (pass setting, tier) per table, with measured quality.
    ``keep_degraded``: keep variants beyond their tolerance too (planning with recovery, which
    repairs them; the tolerance is about the fitted table)."""
    tiers = [t.name for t in hw.placeable]
    labelled = bool(sample) and all(b.labels is not None for b in sample)
    y = np.concatenate([b.labels.numpy() for b in sample]) if labelled else None
    auc_base = auc(y, _logits(model, sample)) if labelled else None
    configured, skipped = grid_passes(grid)
    variants: dict[str, list[Variant]] = {t: [] for t in model.embeddings}
    reps: dict[str, Representation] = {}
    candidates: list[tuple[str, str | None, Representation, float]] = []
    for t, rep in model.embeddings.items():
        candidates.append((t, None, rep, 0.0))
    bar = tqdm(configured, desc="fit variants", unit="setting", file=sys.stderr,
               disable=not progress, leave=False)
    for cp in bar:
        bar.set_postfix_str(str(cp))
        try:
            rewritten, report = apply(model, [cp], profile=profile, sample=sample)
        except RewriteError as e:
            skipped.append({"table": "*", "pass": str(cp), "reason": str(e)})
            continue
        for tr in report.tables:
            if tr.status != "rewritten":
                skipped.append({"table": tr.table, "pass": str(cp), "reason": tr.reason})
            elif not tr.within_tolerance and not keep_degraded:
                skipped.append({"table": tr.table, "pass": str(cp),
                                "reason": f"exceeds its tolerance ({tr.tolerance}; rel {tr.rel_error:.3g})"})
            else:
                candidates.append((tr.table, str(cp), rewritten.embeddings[tr.table], tr.rel_error or 0.0))
    for t, spec, rep, rel in tqdm(candidates, desc="measure variants", unit="variant", file=sys.stderr,
                                  disable=not progress, leave=False):
        drop = 0.0
        if labelled and spec is not None:
            drop = auc_base - auc(y, _logits(model.with_tables({t: rep}), sample))
        for tier in tiers:
            v = variant_of(t, spec, rep, tier, rel, drop, "measured" if labelled else "unmeasured")
            variants[t].append(v)
            reps[v.key] = rep
    return Enumeration(variants, reps, skipped, auc_base, labelled)


def restrict(enum: Enumeration, max_rel_error: float | None) -> Enumeration:
    """Drop variants whose measured relative error exceeds ``max_rel_error`` (keep always stays)."""
    if max_rel_error is None:
        return enum
    kept = {t: [v for v in vs if v.pass_spec is None or v.rel_error <= max_rel_error]
            for t, vs in enum.variants.items()}
    return dataclasses.replace(enum, variants=kept)
