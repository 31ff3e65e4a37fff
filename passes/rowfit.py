"""Fitting a representation to a trained table's rows, weighted by access frequency.

Minimise  L = Σ_x w_x ||f(x) − W[x]||² / Σ_x w_x  over the representation's parameters, with
w_x the pass context's row weights (sampled access counts + 1).  For tables larger than one
minibatch the weighting is done by *sampling*: ids are drawn with P(x) ∝ w_x, so the plain mean
squared error of a minibatch is an unbiased estimate of L; smaller tables are fitted full-batch
with the weights in the loss.  Adam with a cosine-decayed learning rate, seeded, tqdm on stderr.
Also what every fitted pass shares: the byte budget of a ``compression``, option validation,
and the skips (not an fp32 table, fewer than 2 rows, not smaller than the table).

``max_error`` defaults of the fitted passes are 0.9: the pipeline's relative error
||Δ||_F / ||e||_F is 1.0 for a representation that outputs zeros, so 0.9 rejects a table whose
fit is barely better than dropping it, and accepts the lossy fits these passes exist to make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from rewrite.core.embedding import TableBag
from rewrite.core.pass_contract import PassContext, Selection, Skip, option, plain_fp32_table
from rewrite.core.tracing import EmbeddingSite


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
    if getattr(cfg, "steps", 0) < 0 or getattr(cfg, "batch_size", 1) < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")
    if getattr(cfg, "lr", 1.0) <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.max_error is not None and cfg.max_error < 0:
        raise ValueError(f"max_error must be >= 0, got {cfg.max_error}")


@dataclass(frozen=True)
class FitOptions(Selection):
    """The gradient fit's knobs (``fit_rows``), one definition for every pass fitted by Adam
    (dhe, hybrid, memrec); a config inherits it and adds its own shape options."""

    steps: int = option(3000, "Adam steps of the fit")
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
