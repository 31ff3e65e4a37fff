"""The pass manager: run configured passes over a model's tables, verify, report.

For each pass in order: capture the current model, select the tables (``Selection``), call the
pass on each selected site, swap accepted rewrites into a new model (the graph keeps its shape:
one leaf module per table), lint the re-captured graph, and verify every rewritten table against
the representation it replaced on the sample bags:

* ``error_bound`` given (exact forms): max |Δ| per bag <= bound × bag length (+ fp32 slack);
* otherwise: relative error ||Δ||_F / ||e||_F <= the config's ``max_error`` (if it has one).

At the end the whole model is compared with the original on the sample batches (max / mean
|Δ logit|; with labels AUC and log loss of both).  The original model is never modified.

Memory: tables are handled one at a time; a table mapped from its checkpoint file stays marked
for random lookups except the row block a pass is reading front to back, and once the table is
done its pages are handed back (``rewrite.core.mapped``), so a checkpoint read through a memory map
never becomes resident as a whole; the rewrite of a mapped table is spilled to a scratch file
and mapped back (``mapped.spill``), so the results do not pile up in memory either.

Progress: one tqdm bar on stderr across every (pass, table) of the run, advanced by each table's
fp32 elements plus ``TABLE_OVERHEAD`` (a fit's fixed cost: the fitted passes run at least a few
hundred steps however small the table), so its ETA covers the whole run, not one table.  A run
in which no table is rewritten is a result, not an error: ``ApplyReport.rewritten`` is 0 and the
report says why for each table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from rewrite.core.batch import Batch, validate
from rewrite.core.embedding import Representation
from rewrite.core.errors import RewriteError, VerificationError
from rewrite.core.mapped import abs_max, done_reading, is_mapped, logits_by_table, lookup, spill
from rewrite.core.metrics import auc, logloss
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import ConfiguredPass, PassContext, Rewrite, Skip
from rewrite.core.access_profile import AccessProfile
from rewrite.core.synthetic import multi_hot_batch
from rewrite.core.tracing import capture

FP32_SLACK = 1e-5   # relative, for fp32 accumulation-order differences
SHOWN_FAILURES = 3  # tables named in a tolerance failure's one-line message
TABLE_OVERHEAD = 32_768   # progress units (fp32 elements) a table costs besides its size


@dataclass
class TableReport:
    table: str
    pass_name: str
    status: str                       # "rewritten" | "skipped"
    reason: str = ""
    before: str = ""
    after: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    max_abs_diff: float | None = None
    rel_error: float | None = None
    tolerance: str = ""
    within_tolerance: bool = True
    fit_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ApplyReport:
    tables: list[TableReport]
    embedding_bytes_before: int
    embedding_bytes_after: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    samples: int
    quality: dict[str, float] = field(default_factory=dict)   # auc_before/after, logloss_...

    @property
    def ok(self) -> bool:
        return all(t.within_tolerance for t in self.tables)

    @property
    def rewritten(self) -> int:
        """Tables rewritten by some pass (0: every table was skipped, the model is unchanged)."""
        return len({t.table for t in self.tables if t.status == "rewritten"})

    def to_json(self) -> dict[str, Any]:
        return {"embedding_bytes_before": self.embedding_bytes_before,
                "embedding_bytes_after": self.embedding_bytes_after,
                "compression": self.embedding_bytes_before / max(1, self.embedding_bytes_after),
                "max_abs_logit_diff": self.max_abs_logit_diff,
                "mean_abs_logit_diff": self.mean_abs_logit_diff,
                "samples": self.samples, **self.quality, "within_tolerance": self.ok,
                "tables_rewritten": self.rewritten,
                "tables": [vars(t) for t in self.tables]}


def default_sample(model: RecModel, batches: int = 4, batch_size: int = 256, seed: int = 0) -> list[Batch]:
    """Ragged random batches (empty bags, every table's largest id) when no data is given."""
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [multi_hot_batch(rows, batch_size, model.spec.n_dense, mean_len=2.0, seed=seed + i)
            for i in range(batches)]


def table_bags(model: RecModel, batches: list[Batch], table: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (indices, offsets) bags of every feature that looks up ``table``, per batch."""
    feats = [f for f, t in enumerate(model.feature_tables) if t == table]
    out = []
    for b in batches:
        bounds = b.offsets[:: b.size].tolist()
        for f in feats:
            lo = bounds[f]
            out.append((b.indices[lo:bounds[f + 1]], b.offsets[f * b.size:(f + 1) * b.size + 1] - lo))
    return out


@torch.no_grad()
def compare_tables(old: Representation, new: Representation, bags) -> tuple[float, float, float]:
    """(max |Δ| relative to bag length, max |Δ|, ||Δ||_F / ||e||_F) over the bags."""
    worst_per_id, worst, num, den = 0.0, 0.0, 0.0, 0.0
    for idx, off in bags:
        a, b = lookup(old, idx, off), new(idx, off)      # the original may be mapped from its file
        d = (a - b).abs()
        lengths = (off[1:] - off[:-1]).clamp(min=1).to(d.dtype).unsqueeze(1)
        if d.numel():
            worst_per_id = max(worst_per_id, float((d / lengths).max()))
            worst = max(worst, float(d.max()))
        num += float((d ** 2).sum())
        den += float((a ** 2).sum())
    return worst_per_id, worst, (num / den) ** 0.5 if den > 0 else 0.0


def _check(rw: Rewrite, cfg: Any, old: Representation, per_id: float, rel: float) -> tuple[str, bool]:
    if rw.error_bound is not None:     # the slack scales with the table's values where they pass 1:
        bound = rw.error_bound + FP32_SLACK    # that costs a read of the whole table, done only if needed
        if per_id > bound:
            bound = rw.error_bound + FP32_SLACK * max(1.0, float(_scale(old)))
        return f"max |Δ| per id <= {bound:.3g}", per_id <= bound
    max_error = getattr(cfg, "max_error", None)
    if max_error is None:
        return "approximation (no bound)", True
    return f"relative error <= {max_error:g}", rel <= max_error


def _scale(rep: Representation) -> float:
    return max((abs_max(t) for t in rep.state_dict().values() if t.is_floating_point() and t.numel()),
               default=1.0)


@torch.no_grad()
def _logits(model: RecModel, batches: list[Batch]) -> np.ndarray:
    """The model's logits on ``batches``, one table at a time (``mapped.logits_by_table``)."""
    return np.concatenate([x.numpy() for x in logits_by_table(model, batches)]) if batches else np.zeros(0)


def _run_on_site(cp: ConfiguredPass, site, current: RecModel, ctx: PassContext,
                 sample: list[Batch]) -> tuple[TableReport, Representation | None]:
    """One pass on one selected table: its report, and the verified new representation or None."""
    cfg, info = cp.config, cp.info
    old = current.embeddings[site.name]
    rep = TableReport(site.name, cp.name, "skipped", before=old.describe(), bytes_before=old.num_bytes())
    if site.rows < cfg.min_rows:
        rep.reason = f"{site.rows} rows < min_rows={cfg.min_rows}"
        return rep, None
    t0 = time.perf_counter()
    result = info.run(site, cfg, ctx)
    rep.fit_seconds = time.perf_counter() - t0
    if isinstance(result, Skip):
        rep.reason = result.reason
        return rep, None
    new = result.representation.eval()
    per_id, worst, rel = compare_tables(old, new, table_bags(current, sample, site.name))
    rep.tolerance, rep.within_tolerance = _check(result, cfg, old, per_id, rel)
    rep.status, rep.after, rep.bytes_after = "rewritten", new.describe(), new.num_bytes()
    rep.max_abs_diff, rep.rel_error, rep.notes = worst, rel, dict(result.notes)
    return rep, new


def apply(model: RecModel, passes: Iterable[ConfiguredPass], profile: AccessProfile | None = None,
          sample: list[Batch] | None = None, seed: int = 0) -> tuple[RecModel, ApplyReport]:
    """Run ``passes`` in order; return the rewritten model and the verification report."""
    model.eval()
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    sample = [validate(b, model.spec.n_dense, rows, "sample batch") for b in (sample or default_sample(model))]
    passes = list(passes)
    for cp in passes:   # before any fitting: bad input fails fast
        unknown = [t for t in cp.config.tables if t not in model.embeddings]
        if unknown:
            raise RewriteError(f"pass {cp.name}: unknown table(s) {', '.join(unknown)} "
                               f"(tables: {', '.join(model.embeddings)})")
    current, reports = model, []
    work = {site.name: site.rows * site.dim + TABLE_OVERHEAD for site in capture(model)[1]}
    total = sum(work[t] for cp in passes for t in work if not cp.config.tables or t in cp.config.tables)
    bar = tqdm(total=total, desc="rewrite", unit="elem", unit_scale=True, leave=False, mininterval=1.0)
    try:
        for cp in passes:
            cfg = cp.config
            _, sites = capture(current)
            ctx = PassContext(current, profile, sample, seed)
            new_tables: dict[str, Representation] = {}
            for site in sites:
                if cfg.tables and site.name not in cfg.tables:
                    continue
                bar.set_postfix_str(f"{cp.name} {site.name}", refresh=False)
                tensors = list(current.embeddings[site.name].state_dict().values())
                rep, new = _run_on_site(cp, site, current, ctx, sample)
                done_reading(*tensors)                # its file pages handed back, if mapped
                if new is not None and any(is_mapped(t) for t in tensors):
                    spill(new)                        # larger than memory: results out of RSS too
                bar.update(work.get(site.name, TABLE_OVERHEAD))
                reports.append(rep)
                if new is not None:
                    new_tables[site.name] = new
            if new_tables:
                current = current.with_tables(new_tables)
                capture(current)[0].graph.lint()
    finally:      # a failing pass leaves no half-drawn bar before its error line
        bar.close()
    base, out = _logits(model, sample), _logits(current, sample)
    diff = np.abs(base - out)
    report = ApplyReport(reports, model.embedding_bytes(), current.embedding_bytes(),
                         float(diff.max()) if diff.size else 0.0,
                         float(diff.mean()) if diff.size else 0.0, len(base))
    if sample and all(b.labels is not None for b in sample):
        y = np.concatenate([b.labels.numpy() for b in sample])
        report.quality = {"auc_before": auc(y, base), "auc_after": auc(y, out),
                          "logloss_before": logloss(y, base), "logloss_after": logloss(y, out)}
    return current, report


def require_within_tolerance(report: ApplyReport) -> None:
    bad = [t for t in report.tables if not t.within_tolerance]
    if bad:
        worst = ", ".join(f"{t.table} ({t.pass_name}: {t.tolerance}; max |Δ| {t.max_abs_diff:.3g}, "
                          f"rel {t.rel_error:.3g})" for t in bad[:SHOWN_FAILURES])
        more = f" and {len(bad) - SHOWN_FAILURES} more tables" if len(bad) > SHOWN_FAILURES else ""
        raise VerificationError(f"rewrite exceeds its tolerance on {worst}{more}; "
                                f"use --allow-degraded to keep it anyway")
