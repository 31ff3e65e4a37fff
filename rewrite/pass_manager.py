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

On N ranks (``group``, ``rewrite.distributed``): each pass's selected tables are placed on the
ranks by estimated fit cost (``fit_cost``; greedy longest-processing-time, ``distributed.place``),
each rank fits and verifies its own, and ``fit_sharing.share`` hands every fitted table to every
rank before the next pass, so each rank holds the same model after every pass and the result is
the one-process result, byte for byte (passes seed per table, never per rank).  A rank that
raises fails every rank with its error.  The whole-model comparison at the end runs on each rank.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from rewrite.core.batch import Batch, validate
from rewrite.core.embedding import Representation
from rewrite.core.errors import RewriteError, VerificationError
from rewrite.core.mapped import FilePages, abs_max, done_reading, is_mapped, logits_by_table, lookup, spill
from rewrite.core.metrics import auc, logloss
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import ConfiguredPass, PassContext, Rewrite, Skip
from rewrite.core.access_profile import AccessProfile
from rewrite.core.synthetic import multi_hot_batch
from rewrite.core.tracing import capture
from rewrite.distributed import SINGLE, Group, place

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
    fit_cpu_seconds: float = 0.0      # CPU time of this process (all its threads) during the fit
    rank: int = 0                     # the rank that fitted it (0 on one process)
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
    pages = FilePages(*old.state_dict().values())      # the original may be mapped from its file
    for idx, off in bags:
        a, b = lookup(old, idx, off, pages), new(idx, off)
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = info.run(site, cfg, ctx)
    rep.fit_seconds, rep.fit_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if isinstance(result, Skip):
        rep.reason = result.reason
        return rep, None
    new = result.representation.eval()
    per_id, worst, rel = compare_tables(old, new, table_bags(current, sample, site.name))
    rep.tolerance, rep.within_tolerance = _check(result, cfg, old, per_id, rel)
    rep.status, rep.after, rep.bytes_after = "rewritten", new.describe(), new.num_bytes()
    rep.max_abs_diff, rep.rel_error, rep.notes = worst, rel, dict(result.notes)
    return rep, new


def fit_cost(site, cfg: Any) -> float:
    """A table's estimated fit cost, in the progress bar's unit: rows × dim + ``TABLE_OVERHEAD``
    fp32 elements (TT-SVD + ALS, quantization and the row-sampled fits are linear in the table's
    elements; the overhead is the fitted passes' minimum step count).  Within one pass every table
    shares the config, so only the relative size matters; a table below ``min_rows`` costs 0."""
    return 0.0 if site.rows < cfg.min_rows else float(site.rows * site.dim + TABLE_OVERHEAD)


def _fit(cp: ConfiguredPass, sites, current: RecModel, ctx: PassContext, sample: list[Batch],
         group: Group, bar, output=None) -> dict[str, tuple[TableReport, Representation | None]]:
    """Fit and verify ``sites`` (this rank's share of one pass's tables); on N ranks, return every
    rank's fits (``fit_sharing.share``), raising the first failing rank's error on every rank.
    ``output``: where spilled results go (``apply``)."""
    fitted, error = [], None
    try:
        group.injected_failure()
        for i, site in enumerate(sites, 1):
            bar.set_postfix_str(f"{cp.name} {site.name}", refresh=False)
            tensors = list(current.embeddings[site.name].state_dict().values())
            rep, new = _run_on_site(cp, site, current, ctx, sample)
            done_reading(*tensors)                # its file pages handed back, if mapped
            if new is not None and any(is_mapped(t) for t in tensors):   # larger than memory:
                spill(new, into=None if group.distributed else output)   # results out of RSS too
            rep.rank = group.rank
            bar.update(site.rows * site.dim + TABLE_OVERHEAD)
            if group.distributed:   # one line per table: the bars of N ranks share one terminal
                tqdm.write(f"{cp.name} {site.name}: {rep.status} in {rep.fit_seconds:.2f} s "
                           f"({i}/{len(sites)} of this rank's tables)", file=sys.stderr)
            fitted.append((rep, new))
    except Exception as e:   # noqa: BLE001 (on N ranks: shared, and every rank fails with it)
        if not group.distributed:
            raise
        error = e
    if not group.distributed:
        return {rep.table: (rep, new) for rep, new in fitted}
    from rewrite.fit_sharing import share

    return share(group, fitted, error, TableReport)


def apply(model: RecModel, passes: Iterable[ConfiguredPass], profile: AccessProfile | None = None,
          sample: list[Batch] | None = None, seed: int = 0,
          group: Group = SINGLE, output=None) -> tuple[RecModel, ApplyReport]:
    """Run ``passes`` in order; return the rewritten model and the verification report.
    ``group``: the ranks sharing the fits (every rank calls this with the same arguments).
    ``output``: the file the result will be saved to (``rewrite.core.result_file.ResultFile``),
    into which tables spilled out of memory are written as they are made (on N ranks: rank 0's
    ``output``, filled after each pass in table order, so the file is one process's)."""
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
    sites = {site.name: site for site in capture(model)[1]}   # rows and dim stay through the passes
    owners = [place({n: fit_cost(s, cp.config) for n, s in sites.items()
                     if not cp.config.tables or n in cp.config.tables}, group.world) for cp in passes]
    total = sum(sites[n].rows * sites[n].dim + TABLE_OVERHEAD
                for owner in owners for n, r in owner.items() if r == group.rank)
    bar = tqdm(total=total, desc="rewrite", unit="elem", unit_scale=True, leave=False, mininterval=1.0,
               disable=group.distributed)   # N ranks: a line per table instead (``_fit``)
    try:
        for cp, owner in zip(passes, owners):
            _, sites = capture(current)
            ctx = PassContext(current, profile, sample, seed)
            chosen = [s for s in sites if s.name in owner]
            fits = _fit(cp, [s for s in chosen if owner[s.name] == group.rank], current, ctx, sample, group, bar,
                        output)
            new_tables: dict[str, Representation] = {}
            for site in chosen:
                rep, new = fits[site.name]
                reports.append(rep)
                if new is not None:
                    new_tables[site.name] = new
                    if output is not None and group.distributed and \
                            any(is_mapped(t) for t in current.embeddings[site.name].state_dict().values()):
                        spill(new, into=output)   # in one process's order: the same file as one process
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
