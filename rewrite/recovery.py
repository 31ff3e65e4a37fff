"""Recovery: distil a rewritten model back towards the original (teacher) on sample data.

Before: a rewritten model whose tables were fitted row by row (their errors add up in the
        interaction and the top MLP).
After:  the same representations with their float tensors (and optionally the top MLP) trained
        end to end to minimise, on DATA,
            L = mean (z_s − z_t)²  +  λ · BCE(z_s, y)        (the BCE term only when DATA has labels)
        z_t the original model's logits, z_s the student's.

Which tensors train: every floating-point parameter *and* persistent floating buffer of each
table whose representation differs from the original's (kind or params), so float scales /
biases are refitted too.  Non-persistent buffers are derived constants (e.g. the row-wise int4
table's fp16 decode table), never trained: training one once sent the held-out loss from 0.34
to 5e9 and early stopping kept the unrecovered start.  Tensors stored in fp16 / bf16 are trained through an fp32 master copy
(the forward pass rounds it to the storage dtype; gradients pass straight through the
rounding) and written back rounded.  Integer tensors (quantized codes, hash coefficients) stay
as they are and are listed in the report.  A representation with a ``training_form()`` (e.g. ``mdq``,
whose codes are integers) is trained in that float form instead (quantization-aware: its forward
rounds to what is stored, gradients pass straight through) and turned back by ``stored_form()``
after the best state is restored, so the returned model computes what was measured.  On N ranks (``ranks``): data-parallel, DDP over the
trained tensors (``rewrite.data_parallel``); each rank computes the teacher's logits for its
share of the rows (gathered once), trains on every N-th row of each batch and measures its N-th
of the held-out rows (the loss all-reduced), so steps and stopping are one process's.

Length and early stopping: by default up to ``MAX_EPOCHS`` passes over the training part, which
early stopping cuts short.  A seeded random ``holdout`` share of DATA's rows (at most
``MAX_HOLDOUT``) is never trained on (random, not the file's tail: in a log ordered by time
the tail holds the users who arrived last, whose ids recovery would then never see); L is measured on it
``EVALS_PER_EPOCH`` times per epoch (``eval_every`` steps), the best state is kept, and training
stops after ``patience`` evaluations in a row without a new best (default 4: two epochs).
Schedule (Adam): the rate ramps up linearly over the first ``warmup`` steps (a fifth of the run,
at most one epoch: Adam's first steps are lr-sized whatever the gradient, which knocks a good
student off its fit), then decays along a cosine to ``MIN_LR_FRACTION`` of the peak at the
last step, so late epochs refine instead of oscillating around the fit.  Two rates: ``lr`` for
gathered tensors (tables, hashed arrays, token tables) and ``lr · DENSE_LR_SCALE`` for weights of
``nn.Linear`` layers (the top MLP, DHE decoders), which every sample updates.  Inputs are never
modified: the result shares nothing trainable with ``original`` or ``rewritten``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from tqdm import tqdm

from rewrite.data import Dataset, check_matches
from rewrite.core.errors import RewriteError
from rewrite.core.metrics import auc, logloss
from rewrite.core.model import RecModel
from rewrite.data_parallel import data_parallel, shard_rows
from rewrite.distributed import SINGLE, Group

NOTHING_TO_TRAIN = "no rewritten table differs from the original and train_top is off: nothing to train"
NO_FLOAT_TENSORS = ("the rewritten tables hold no float tensor to train (integer codes only) and "
                    "train_top is off: nothing to train")
MAX_HOLDOUT = 20_000           # rows: enough for a stable loss estimate, cheap to evaluate
DEFAULT_LR = 5e-2             # Adam peak rate (cosine-decayed): measured on the MovieLens model
                               # (robe / dhe at 16x, top MLP trained): 5e-3 / 2e-2 / 5e-2 gave test
                               # AUC drops 0.0125 / 0.0102 / 0.0074 (robe, 30 epochs) and - / 0.0128 /
                               # 0.0080 (dhe, 20 epochs); the held-out loss kept falling at 5e-2
WARMUP_DIVISOR = 5             # the learning rate ramps up linearly over the first 1/5 of the steps
MAX_EPOCHS = 20                # default length: early stopping ends it sooner when it stops gaining
EVALS_PER_EPOCH = 2            # held-out evaluations per epoch (early-stopping granularity)
MIN_EVAL_STEPS = 10            # never evaluate more often than every 10 steps
MIN_LR_FRACTION = 0.05         # the cosine decay ends at 5% of the peak rate
DENSE_LR_SCALE = 0.2           # Linear weights: measured on the demo, DHE at 100x recovers at 1e-3
                               # and loses AUC at 5e-3, while ROBE arrays want 5e-3 (benchmarks/quality.py)


@dataclass
class RecoveryReport:
    tables: list[str]                      # tables whose representations were trained
    train_top: bool
    frozen: list[str]                      # integer tensors left as they are
    steps: int                             # optimiser steps taken
    best_step: int                         # the step whose state was kept (0: the start)
    stopped_early: bool
    holdout_rows: int
    holdout_loss_before: float
    holdout_loss_after: float
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)   # (step, holdout loss)
    eval: dict[str, float] = field(default_factory=dict)            # on --eval data
    skipped: str = ""                      # why nothing was trained (the model is returned as it was)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def changed_tables(original: RecModel, rewritten: RecModel) -> list[str]:
    """Tables whose representation differs from the original's (kind or constructor params)."""
    return [name for name, rep in rewritten.embeddings.items()
            if name not in original.embeddings or rep.spec() != original.embeddings[name].spec()]


def _student(original: RecModel, rewritten: RecModel, tables: list[str], train_top: bool) -> RecModel:
    new = rewritten.with_tables({t: _training_copy(rewritten.embeddings[t]) for t in tables})
    if train_top:
        new.top = copy.deepcopy(rewritten.top)
    return new


def _training_copy(rep):
    """A private copy of ``rep`` to train: its ``training_form()`` where it has one."""
    form = rep.training_form()
    return copy.deepcopy(rep) if form is None else form


def _stored(model: RecModel, tables: list[str]) -> RecModel:
    """``model`` with every trained table's training form turned back into its stored form."""
    back = {t: form for t in tables if (form := model.embeddings[t].stored_form()) is not model.embeddings[t]}
    return model.with_tables(back) if back else model


def _trainable(model: RecModel, tables: list[str], train_top: bool):
    """(name -> tensor) of float tensors to train (parameters and persistent buffers), and the
    names of integer tensors left alone."""
    prefixes = [f"embeddings.{t}." for t in tables] + (["top."] if train_top else [])
    constants = {f"{m}.{b}" if m else b for m, mod in model.named_modules()
                 for b in mod._non_persistent_buffers_set}
    train, frozen = {}, []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not any(name.startswith(p) for p in prefixes) or name in constants:
            continue
        if t.is_floating_point():
            train[name] = t
        elif name.startswith("embeddings."):
            frozen.append(name)
    return train, frozen


def _lr_scales(model: RecModel, tables: list[str]) -> dict[str, float]:
    """Tensor name -> rate multiplier, for tables whose training form sets ``lr_scale`` (e.g.
    mdq's codes: a step of ``lr`` would jump several quantization steps)."""
    out = {}
    for t in tables:
        s = getattr(model.embeddings[t], "lr_scale", None)
        if s is not None and s != 1.0:
            out.update({f"embeddings.{t}.{n}": float(s) for n, _ in model.embeddings[t].named_parameters()})
    return out


def _linear_tensors(model: torch.nn.Module) -> set[str]:
    """Names of the weights and biases of every nn.Linear in ``model``."""
    return {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            for p, _ in mod.named_parameters(recurse=False)}


def _loss(student_logits, teacher_logits, labels, label_weight: float) -> torch.Tensor:
    loss = torch.mean((student_logits - teacher_logits) ** 2)
    if labels is not None and label_weight > 0:
        loss = loss + label_weight * torch.nn.functional.binary_cross_entropy_with_logits(student_logits, labels)
    return loss


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak rate at optimiser step ``step`` (0-based): linear warm-up, cosine decay.

        f = min(1, (step + 1) / warmup) · (m + (1 − m) · (1 + cos(π · p)) / 2),  p = step / total
    with m = MIN_LR_FRACTION.
    """
    p = min(1.0, step / max(1, total))
    return min(1.0, (step + 1) / warmup) * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * p)))


def recover(original: RecModel, rewritten: RecModel, data: Dataset, steps: int | None = None,
            epochs: float | None = None, lr: float = DEFAULT_LR, eval_data: Dataset | None = None,
            train_top: bool = False, seed: int = 0, batch_size: int = 1024, label_weight: float = 0.5,
            holdout: float = 0.1, eval_every: int | None = None, patience: int = 4,
            tables: list[str] | None = None, ranks: Group = SINGLE) -> tuple[RecModel, RecoveryReport]:
    """Train the rewritten model's new representations to match ``original`` on ``data``.

    ``steps`` or ``epochs`` (passes over the training part; default ``MAX_EPOCHS``, cut short by
    early stopping after ``patience`` evaluations without a new best).  Returns a new
    model (inputs untouched) and the report.  ``tables`` defaults to ``changed_tables``; when
    there is nothing to train (no table and not ``train_top``) it returns ``rewritten`` itself
    with ``report.skipped`` saying so.
    """
    if steps is not None and epochs is not None:
        raise RewriteError("recovery: give steps or epochs, not both")
    if (steps is not None and steps < 1) or (epochs is not None and epochs <= 0):
        raise RewriteError(f"recovery: steps must be >= 1 and epochs > 0 (got steps={steps}, epochs={epochs})")
    if lr <= 0 or batch_size < 1 or not 0 < holdout < 1 or label_weight < 0:
        raise RewriteError("recovery: need lr > 0, batch_size >= 1, 0 < holdout < 1, label_weight >= 0")
    check_matches(data, original.spec.n_dense, len(original.spec.features))
    tables = changed_tables(original, rewritten) if tables is None else list(tables)
    unknown = [t for t in tables if t not in rewritten.embeddings]
    if unknown:
        raise RewriteError(f"recovery: unknown table(s) {', '.join(unknown)}")
    if not tables and not train_top:     # a result, not an error: every pass skipped every table
        return rewritten, RecoveryReport([], False, [], 0, 0, False, 0, None, None, 0.0, skipped=NOTHING_TO_TRAIN)
    n_hold = min(MAX_HOLDOUT, max(1, int(data.n_samples * holdout)))
    n_train = data.n_samples - n_hold
    if n_train < 1:
        raise RewriteError(f"{data.path}: {data.n_samples} rows are too few to hold out {n_hold} for early stopping")
    original.eval()
    student = _student(original, rewritten, tables, train_top).eval()
    named, frozen = _trainable(student, tables, train_top)
    if not named:                        # e.g. only row-wise quantized tables: codes and scales are bytes
        return rewritten, RecoveryReport(tables, False, frozen, 0, 0, False, 0, None, None, 0.0,
                                         skipped=NO_FLOAT_TENSORS)
    masters = {n: torch.nn.Parameter(t.detach().to(torch.float32).clone()) for n, t in named.items()}
    # everything else enters the forward detached: no gradient reaches shared (original) tensors
    fixed = {n: t.detach() for n, t in [*student.named_parameters(), *student.named_buffers()]
             if n not in masters}
    dense = _linear_tensors(student)
    scaled = _lr_scales(student, tables)
    groups = [{"params": [m for n, m in masters.items() if n not in dense and n not in scaled], "scale": 1.0},
              {"params": [m for n, m in masters.items() if n in dense], "scale": DENSE_LR_SCALE},
              *({"params": [m for n, m in masters.items() if scaled.get(n) == s], "scale": s}
                for s in sorted(set(scaled.values())))]
    # fused: one kernel over every tensor, ~0.6 ms a step instead of ~1.6 ms for the demo's 54
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, fused=True)
    per_epoch = -(-n_train // batch_size)
    total = steps if steps is not None else max(1, int(round((epochs or MAX_EPOCHS) * per_epoch)))
    every = eval_every or max(MIN_EVAL_STEPS, min(per_epoch // EVALS_PER_EPOCH, total // 10 or 1))
    warmup = max(1, min(total // WARMUP_DIVISOR, per_epoch))
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,))).permutation(data.n_samples)
    hold_rows, train_rows = np.sort(order[:n_hold]), order[n_hold:]
    mine = hold_rows[ranks.rank::ranks.world]      # this rank's share of the held-out rows
    hold = [data.batch(mine[lo:lo + 8192]) for lo in range(0, len(mine), 8192)]
    teacher = _teacher_logits(original, data, ranks)   # once: the teacher is fixed (4 bytes per row)
    hold_teacher = [torch.from_numpy(teacher[mine[lo:lo + 8192]]) for lo in range(0, len(mine), 8192)]

    def values() -> dict[str, torch.Tensor]:
        return {**fixed, **{n: (m if named[n].dtype == torch.float32 else m.to(named[n].dtype))
                            for n, m in masters.items()}}

    def holdout_loss() -> float:
        with torch.no_grad():
            v = values()
            tot = sum(float(_loss(functional_call(student, v, b.inputs()), z, b.labels, label_weight)) * b.size
                      for b, z in zip(hold, hold_teacher))
        return float(ranks.all_reduce_sum(np.array([tot]))[0]) / n_hold

    forward = data_parallel(student, values, list(masters.values()), ranks)

    t0 = time.perf_counter()
    best = start = holdout_loss()
    best_state, best_step, history, bad, step = _snapshot(masters), 0, [(0, start)], 0, 0
    bar = tqdm(total=total, desc="recover", unit="step", leave=False)      # stderr, with its ETA
    epoch = 0
    while step < total and bad < patience:
        shuffled = np.random.default_rng(seed + epoch).permutation(train_rows)
        for rows in (np.sort(shuffled[lo:lo + batch_size]) for lo in range(0, n_train, batch_size)):
            rows = shard_rows(rows, ranks)
            if rows is None:
                continue
            b = data.batch(rows)
            for group in opt.param_groups:      # warm-up, then cosine decay (lr_factor)
                group["lr"] = lr * group["scale"] * lr_factor(step, total, warmup)
            z_t = torch.from_numpy(teacher[rows])
            loss = _loss(forward(*b.inputs()), z_t, b.labels, label_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % every == 0 or step == total:
                h = holdout_loss()
                history.append((step, h))
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", holdout=f"{h:.4f}", refresh=False)
                if h < best:
                    best, best_state, best_step, bad = h, _snapshot(masters), step, 0
                else:
                    bad += 1
            if step >= total or bad >= patience:
                break
        epoch += 1
    bar.close()
    with torch.no_grad():
        for n, m in best_state.items():
            named[n].copy_(m.to(named[n].dtype))
    student = _stored(student, tables)
    report = RecoveryReport(tables, train_top, frozen, step, best_step, bad >= patience, n_hold, start, best,
                            time.perf_counter() - t0, history)
    if eval_data is not None and ranks.writes:
        report.eval = evaluate_recovery(original, rewritten, student, eval_data)
    return student, report


@torch.no_grad()
def _teacher_logits(original: RecModel, data: Dataset, ranks: Group = SINGLE, batch_size: int = 8192) -> np.ndarray:
    """The original's logits on every row of ``data`` (float32 [N]); on N ranks each computes a
    contiguous N-th of the rows and the parts are gathered."""
    lo, hi = ranks.rank * data.n_samples // ranks.world, (ranks.rank + 1) * data.n_samples // ranks.world
    part = [original(*b.inputs()).numpy() for b in data.batches(batch_size, limit=hi - lo, start=lo)]
    part = np.concatenate(part).astype(np.float32) if part else np.zeros(0, np.float32)
    if not ranks.distributed:
        return part
    return np.concatenate([np.frombuffer(b, np.float32) for b in ranks.exchange(part.tobytes())])


def _snapshot(masters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: m.detach().clone() for n, m in masters.items()}


@torch.no_grad()
def evaluate_recovery(original: RecModel, rewritten: RecModel, recovered: RecModel, data: Dataset,
                      batch_size: int = 8192) -> dict[str, float]:
    """AUC / log loss of the three models and the logit RMSE of the two students, on ``data``."""
    check_matches(data, original.spec.n_dense, len(original.spec.features))
    out: dict[str, list[np.ndarray]] = {"original": [], "rewritten": [], "recovered": []}
    labels = []
    for b in data.batches(batch_size):
        for key, model in (("original", original), ("rewritten", rewritten), ("recovered", recovered)):
            out[key].append(model.eval()(*b.inputs()).numpy())
        if b.labels is not None:
            labels.append(b.labels.numpy())
    z = {k: np.concatenate(v) for k, v in out.items()}
    res = {"eval_rows": float(len(z["original"]))}
    for k in ("rewritten", "recovered"):
        res[f"logit_rmse_{k}"] = float(np.sqrt(np.mean((z[k] - z["original"]) ** 2)))
    if labels:
        y = np.concatenate(labels)
        for k, v in z.items():
            res[f"auc_{k}"], res[f"logloss_{k}"] = auc(y, v), logloss(y, v)
    return res


def add_recovery_options(command):
    """Click decorator: the ``apply`` command's recovery options (``--recover DATA`` and friends)."""
    import click

    opts = [
        click.option("--recover", "recover_path", type=click.Path(path_type=Path), default=None,
                     help="distil the rewritten model towards the original on this .npz (day of data)"),
        click.option("--steps", "recover_steps", type=int, default=None, help="recovery: optimiser steps"),
        click.option("--epochs", "recover_epochs", type=float, default=None,
                     help=f"recovery: at most this many passes over DATA (default {MAX_EPOCHS}, "
                          f"early stopping ends sooner; not with --steps)"),
        click.option("--lr", "recover_lr", type=float, default=DEFAULT_LR, show_default=True,
                     help="recovery: Adam learning rate"),
        click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None,
                     help="report AUC / log loss on this .npz, kept apart from --recover data"),
        click.option("--recover-top", is_flag=True, help="recovery also trains the top MLP"),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return command


def run_recovery_from_cli(original: RecModel, rewritten: RecModel, recover_path: Path | None,
                          recover_steps: int | None, recover_epochs: float | None, recover_lr: float,
                          eval_path: Path | None, recover_top: bool, dense_transform: str = "log1p",
                          seed: int = 0, ranks: Group = SINGLE) -> tuple[RecModel, dict[str, Any] | None]:
    """What ``apply`` runs after its passes: (model to save, report JSON or None without --recover)."""
    from rewrite import data as data_mod

    if recover_path is None:
        given = [name for name, v in (("--steps", recover_steps), ("--epochs", recover_epochs),
                                      ("--eval", eval_path)) if v is not None]
        if recover_top:
            given.append("--recover-top")
        if given:
            raise RewriteError(f"{', '.join(given)} only apply with --recover DATA")
        return rewritten, None
    if recover_steps is not None and recover_epochs is not None:
        raise RewriteError("--steps and --epochs are exclusive: give one")
    if eval_path is not None and Path(eval_path).resolve() == Path(recover_path).resolve():
        raise RewriteError(f"--eval {eval_path} is the --recover data: evaluate on data kept apart")
    train = data_mod.open(recover_path, dense_transform)
    held = data_mod.open(eval_path, dense_transform) if eval_path is not None else None
    model, report = recover(original, rewritten, train, steps=recover_steps, epochs=recover_epochs,
                            lr=recover_lr, eval_data=held, train_top=recover_top, seed=seed, ranks=ranks)
    return model, {"data": str(recover_path), "eval_data": None if eval_path is None else str(eval_path),
                   "lr": recover_lr, **report.to_json()}
