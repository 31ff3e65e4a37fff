"""Fitting a representation to a trained table's rows, weighted by access frequency.

Minimise  L = Σ_x w_x ||f(x) − W[x]||² / Σ_x w_x  over the representation's parameters, with
w_x the pass context's row weights (sampled access counts + 1).  For tables larger than one
minibatch the weighting is done by *sampling*: ids are drawn with P(x) ∝ w_x, so the plain mean
squared error of a minibatch is an unbiased estimate of L; smaller tables are fitted full-batch
with the weights in the loss.  Adam with a cosine-decayed learning rate, seeded, tqdm on stderr.
Also what every fitted pass shares: the byte budget of a ``compression``, option validation,
and the skips (not an fp32 table, fewer than 2 rows, not smaller than the table).

Defaults that finish in time proportional to the table (``docs/passes.md``, "Sizing and time"):

* size: ``compression`` (table bytes / representation bytes) defaults to ``DEFAULT_COMPRESSION``
  when no explicit shape is given; a table whose smallest form cannot meet the byte budget is
  skipped with the reason (a 2-row table has 128 bytes: no decoder fits in 16);
* steps: ``auto_steps`` — ``FIT_EPOCHS`` sampled passes over the rows, at least ``MIN_STEPS``
  (small tables are fitted full-batch: one step is one pass) and at most ``MAX_STEPS``.

``max_error`` defaults of the fitted passes are 0.9: the pipeline's relative error
||Δ||_F / ||e||_F is 1.0 for a representation that outputs zeros, so 0.9 rejects a table whose
fit is barely better than dropping it, and accepts the lossy fits these passes exist to make.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from rewrite.core.embedding import TableBag
from rewrite.core.pass_contract import PassContext, Selection, Skip, option, plain_fp32_table
from rewrite.core.tracing import EmbeddingSite


DEFAULT_COMPRESSION = 8.0   # bytes ratio: where recovery keeps the AUC on real data (issue 21: dhe 8.1x
                            # -0.0006, hybrid 7.8x -0.0004 after --recover)
MIN_STEPS = 300             # full-batch Adam steps: the fit of a <= batch_size-row table levels off by here
MAX_STEPS = 3000            # the old fixed default: a 1M-row table still gets ~6 sampled passes
FIT_EPOCHS = 6              # sampled passes over a large table's rows


def auto_steps(rows: int, batch_size: int) -> int:
    """Adam steps for a ``rows``-row table: ``FIT_EPOCHS`` passes over the rows in minibatches of
    ``batch_size``, clipped to [MIN_STEPS, MAX_STEPS].  The work (steps × ids per step) then grows
    with the table: rows <= batch_size: MIN_STEPS full-batch steps of ``rows`` ids; larger tables:
    FIT_EPOCHS × rows ids until the cap."""
    return int(min(MAX_STEPS, max(MIN_STEPS, math.ceil(FIT_EPOCHS * rows / batch_size))))


def fit_steps(cfg, rows: int) -> int:
    """The config's ``steps``, or ``auto_steps`` when it is None (the default)."""
    return auto_steps(rows, cfg.batch_size) if cfg.steps is None else int(cfg.steps)


def target_compression(cfg, shape_given: bool) -> float | None:
    """The bytes ratio a fitted pass sizes itself by: ``compression`` if given, else
    ``DEFAULT_COMPRESSION`` unless the user gave an explicit shape (then None: use the shape).
    Both given is a config error (``check_fit_options``)."""
    if cfg.compression is not None:
        return float(cfg.compression)
    return None if shape_given else DEFAULT_COMPRESSION


def over_budget(name: str, smallest_bytes: int, compression: float, table: TableBag, what: str) -> Skip:
    """The skip for a table whose smallest ``name`` form exceeds the byte budget."""
    budget = budget_bytes(table.rows, table.dim, compression)
    return Skip(f"{name}'s smallest form ({what}) takes {smallest_bytes} bytes; compression={compression:g} "
                f"of this {table.num_bytes()}-byte table allows {budget}")


def budget_bytes(rows: int, dim: int, compression: float) -> int:
    """Bytes a representation may take to be ``compression``× smaller than an fp32 table."""
    return int(rows * dim * 4 / compression)


def rms(target: torch.Tensor, weights: torch.Tensor) -> float:
    """Frequency-weighted root-mean-square element of ``target`` [rows, d] (1.0 if all zero)."""
    ms = (weights * (target ** 2).sum(1)).sum() / (weights.sum() * target.shape[1])
    return float(ms.sqrt()) or 1.0


def weighted_rel_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> float:
    """sqrt(Σ w ||pred − target||² / Σ w ||target||²): the relative error the fit minimises."""
    num = (weights * ((pred - target) ** 2).sum(1)).sum()
    den = (weights * (target ** 2).sum(1)).sum()
    return float((num / den).sqrt()) if float(den) > 0 else float(num.sqrt())


FIT_THREADS_BELOW = 1 << 20   # elements per step (ids × dim) under which a fit runs on one thread


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run the block with torch's intra-op thread count at ``n``, restored afterwards.  The fits'
    tensors are small (a 2,048 × 64 activation is 0.5 MB): splitting each op across threads costs
    more than it saves, and on a machine whose cores are busy the threads' barriers stall it —
    measured 6 ms a step on one thread against 200–360 ms on two with another job running."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_rows(rows_of: Callable[[torch.Tensor], torch.Tensor], params: Iterable[torch.nn.Parameter],
             target: torch.Tensor, weights: np.ndarray, steps: int, batch_size: int, lr: float,
             seed: int, desc: str) -> float:
    """Adam on the frequency-weighted MSE of ``rows_of(ids)`` [n, d] against ``target[ids]``.

    Returns the last minibatch loss (mean squared error per row).  ``steps=0`` fits nothing.
    """
    params = list(params)
    n = target.shape[0]
    w = torch.as_tensor(weights, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    full = n <= batch_size
    all_ids = torch.arange(n, dtype=torch.int64)
    w_full = (w / w.sum()).to(torch.float32)
    small = min(n, batch_size) * target.shape[1] < FIT_THREADS_BELOW
    with intra_op_threads(1) if small else contextlib.nullcontext():
        return _adam(rows_of, params, target, w, w_full, all_ids, full, gen, steps, batch_size, lr, desc)


def _adam(rows_of, params, target, w, w_full, all_ids, full, gen, steps, batch_size, lr, desc) -> float:
    opt = torch.optim.Adam(params, lr=lr)
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:           # cosine decay to 5% of lr
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        if full:
            pred = rows_of(all_ids)
            loss = (w_full * ((pred - target) ** 2).sum(1)).sum()
        else:
            ids = torch.multinomial(w, batch_size, replacement=True, generator=gen)
            loss = ((rows_of(ids) - target.index_select(0, ids)) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_value:.3g}", refresh=False)
    return loss_value


def table_rows(rep: torch.nn.Module, rows: int, chunk: int = 65536) -> torch.Tensor:
    """Every row of a representation as [rows, dim] (one single-id bag each), in chunks."""
    out = []
    with torch.no_grad():
        for lo in range(0, rows, chunk):
            ids = torch.arange(lo, min(rows, lo + chunk), dtype=torch.int64)
            out.append(rep.dense_rows(ids))
    return torch.cat(out)


def check_fit_options(cfg) -> None:
    """Validation shared by the fitted passes (compression, steps, batch_size, lr, max_error)."""
    compression = getattr(cfg, "compression", None)
    if compression is not None and not compression >= 1:
        raise ValueError(f"compression must be >= 1, got {compression}")
    steps = getattr(cfg, "steps", 0)
    if (steps is not None and steps < 0) or getattr(cfg, "batch_size", 1) < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")
    if getattr(cfg, "lr", 1.0) <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.max_error is not None and cfg.max_error < 0:
        raise ValueError(f"max_error must be >= 0, got {cfg.max_error}")


@dataclass(frozen=True)
class FitOptions(Selection):
    """The gradient fit's knobs (``fit_rows``), one definition for every pass fitted by Adam
    (dhe, hybrid, memrec); a config inherits it and adds its own shape options."""

    steps: int | None = option(None, "Adam steps of the fit (default: 6 passes over the rows, "
                                     "300..3000: rowfit.auto_steps)")
    batch_size: int = option(2048, "ids per fitting step (sampled by access frequency)")
    lr: float = option(3e-3, "Adam learning rate of the fit")
    max_error: float = option(0.9, "relative embedding error accepted (passes.rowfit explains 0.9)")
    seed: int = option(0, "seed of the hash coefficients and the fit")

    def __post_init__(self):
        check_fit_options(self)


def fp32_table(site: EmbeddingSite, ctx: PassContext, name: str) -> TableBag | Skip:
    """The site's fp32 plain table, or the Skip every fitted pass gives for anything else."""
    table = plain_fp32_table(site, ctx, name, verb="fits")
    if isinstance(table, Skip):
        return table
    if site.rows < 2:
        return Skip(f"{name} needs at least 2 rows, the table has {site.rows}")
    return table


def not_smaller(name: str, new_bytes: int, table: TableBag) -> Skip | None:
    if new_bytes >= table.num_bytes():
        return Skip(f"{name} would take {new_bytes} bytes, not fewer than the table's {table.num_bytes()}")
    return None
