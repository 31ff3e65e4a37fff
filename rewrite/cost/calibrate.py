"""Calibration: time a few configurations here and fit the latency model's constants.

Before: ``Estimator(hw)`` with θ = 1: the roofline terms (gather, compute, traffic, scatter,
calls) straight from the hardware spec.  After: θ fitted so that θ · terms matches measured
seconds, by non-negative least squares on relative error (rows divided by the measurement, so a
50 µs point counts as much as a 5 ms one):

    θ = argmin_{θ >= 0} Σ_i ((θ · terms_i) / t_i - 1)²

Configurations: single representations (tables that live in L2, in the LLC and in DRAM; QR; MD;
one-hot GEMM; bf16) at several batch sizes, two whole 8-table DLRMs (cache-sized tables with
narrow MLPs; DRAM-sized tables, 8 x 64 MiB, with Kaggle-sized MLPs) and the embedding stage of
the latter alone, so the dense terms and many tables in a row are fitted too.  Targets: ``torch``
(eager) and ``onnx-cpu`` (onnxruntime, when installed).  Results are stored per machine and
target in ``<cache>/calibration.json`` and reused.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.optimize import nnls

from rewrite.core.atomic import write_text
from rewrite.core import isa
from rewrite.cost import microbench as mb
from rewrite.cost.estimate import Estimator, TableStats, dense_facts, rep_facts
from rewrite.cost.hardware import cache_dir
from rewrite.cost.types import Cost, HardwareSpec
from rewrite.core.errors import RewriteError

CALIBRATION_VERSION = 1
TARGETS = ("torch", "onnx-cpu")
BATCHES = (64, 512, 4096)
TIMED_BATCHES = 9           # fresh batches per configuration; the median is kept


@dataclass(frozen=True)
class Fit:
    theta: tuple[float, ...]
    points: int
    median_rel_error: float     # |predicted / measured - 1| over the fitted points


def fit_theta(terms: np.ndarray, measured: np.ndarray) -> Fit:
    """Non-negative least squares of relative error (see the module docstring)."""
    terms, measured = np.asarray(terms, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    k = len(Cost.TERMS)
    if terms.ndim != 2 or terms.shape[1] != k or len(terms) != len(measured) or len(terms) < k:
        raise RewriteError(f"calibration needs >= {k} measurements of {k} terms, got {terms.shape}")
    if (measured <= 0).any():
        raise RewriteError("calibration: measured times must be positive")
    a = terms / measured[:, None]
    theta, _ = nnls(a, np.ones(len(measured)))
    rel = np.abs(a @ theta - 1.0)
    return Fit(tuple(float(t) for t in theta), len(measured), float(np.median(rel)))


def _configs():
    """(name, representation) pairs; tables filled with ones (values do not change timing)."""
    from passes.mixed_dim import MDBag
    from passes.onehot import OneHotBag
    from passes.quotient_remainder import QRBag
    from rewrite.core.embedding import TableBag

    def filled(rep):
        with torch.no_grad():
            for p in rep.parameters():
                p.fill_(1.0)
        return rep.eval()

    return [("table 4k", filled(TableBag(4096, 16))),            # 256 KiB: L2
            ("table 256k", filled(TableBag(262144, 16))),        # 16 MiB: LLC
            ("table 4M", filled(TableBag(4 << 20, 16))),         # 256 MiB: DRAM
            ("table bf16 1M", filled(TableBag(1 << 20, 16, dtype="bfloat16"))),
            ("qr c=64 4M", filled(QRBag(4 << 20, 16, 64))),
            ("md d=4 1M", filled(MDBag(1 << 20, 16, 4))),
            ("onehot 64", filled(OneHotBag(64, 16)))]


def _bags(rows: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, (batch,), generator=g), torch.arange(batch + 1, dtype=torch.int64)


def time_median(run: Callable[[int], object], n: int = TIMED_BATCHES) -> float:
    """Median seconds (this thread's CPU time, ``microbench.clock``) of ``run(i)`` over
    i = 0..n-1 after one warm-up (each i a fresh batch).  Every target runs on one thread in the
    calling thread (torch intra-op 1, onnxruntime intra-op 1)."""
    run(n)
    times = []
    for i in range(n):
        t0 = mb.clock()
        run(i)
        times.append(mb.clock() - t0)
    return statistics.median(times)


def runner(target: str, module: torch.nn.Module, example: tuple[torch.Tensor, ...], workdir: Path):
    """A callable(inputs) -> outputs running ``module`` on ``target`` with one thread."""
    if target == "torch":
        return lambda inputs: module(*inputs)
    if target == "onnx-cpu":
        import onnxruntime as ort

        path = workdir / f"m{id(module)}.onnx"
        names = [f"in{i}" for i in range(len(example))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), dynamo=False, input_names=names,
                              dynamic_axes={n: {0: f"d{i}"} for i, n in enumerate(names)})
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda inputs: sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    raise RewriteError(f"calibration: unknown target {target!r} (choose {', '.join(TARGETS)})")


def target_available(target: str) -> bool:
    if target != "onnx-cpu":
        return target == "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def measure(hw: HardwareSpec, target: str, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Terms and measured seconds for every configuration x batch on ``target``."""
    from rewrite.core.model import ModelSpec, RecModel
    from rewrite.core.embedding import TableBag

    say = (lambda m: print(f"[calibrate {target}] {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    est, stats = Estimator(hw), TableStats()
    rows, ys, names = [], [], []
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, hw.threads or 1))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, rep in _configs():
                facts = rep_facts(rep)
                run = runner(target, rep, _bags(rep.rows, 8, 0), Path(tmp))
                for b in BATCHES:
                    bags = [_bags(rep.rows, b, s) for s in range(TIMED_BATCHES + 1)]
                    t = time_median(lambda i: run(bags[i]))
                    rows.append(est.terms_table(facts, "dram", stats, b))
                    ys.append(t)
                    names.append(f"{name} @ {b}")
                    say(f"{name} batch {b}: {t * 1e6:.0f} us")
            for label, n_rows, widths, whole in (
                    ("dlrm 8x4k narrow", 4096, ((64, 16), (64, 32, 1)), True),
                    ("dlrm 8x1M wide", 1 << 20, ((512, 256, 64, 16), (512, 256, 1)), True),
                    ("8x1M tables only", 1 << 20, ((16,), (1,)), False)):
                model = _small_dlrm(ModelSpec, RecModel, TableBag, n_rows, *widths)
                dense = dense_facts(model)
                module = _Bags(model) if whole else _TablesOnly(model)
                example = _model_inputs(model, 8, 0, n_rows)
                run = runner(target, module, example if whole else example[1:], Path(tmp))
                for b in BATCHES:
                    inputs = [_model_inputs(model, b, s, n_rows)[0 if whole else 1:]
                              for s in range(TIMED_BATCHES + 1)]
                    t = time_median(lambda i: run(inputs[i]))
                    terms = sum(est.terms_table(rep_facts(rep), "dram", TableStats(cache_share=1 / 8), b)
                                for rep in model.embeddings.values())
                    if whole:
                        terms = terms + est.terms_dense(dense, b)
                    rows.append(terms)
                    ys.append(t)
                    names.append(f"{label} @ {b}")
                    say(f"{label} batch {b}: {t * 1e6:.0f} us")
    finally:
        torch.set_num_threads(old)
    return np.array(rows), np.array(ys), names


class _Bags(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, dense, *bags):
        return self.model.forward_bags(dense, list(bags))


class _TablesOnly(_Bags):
    """The embedding stage alone: every table's pooled bags, concatenated."""

    def forward(self, *bags):
        return torch.cat([self.model.embeddings[t](bags[2 * f], bags[2 * f + 1])
                          for f, t in enumerate(self.model.feature_tables)], 1)


def _small_dlrm(ModelSpec, RecModel, TableBag, rows, bottom, top):
    torch.manual_seed(0)
    tables = {f"t{i}": TableBag(rows, 16, weight=torch.full((rows, 16), 0.01)) for i in range(8)}
    spec = ModelSpec(13, bottom, top, tuple((f"f{i}", f"t{i}") for i in range(8)))
    return RecModel(spec, tables).eval()


def _model_inputs(model, batch: int, seed: int, rows: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(batch, model.spec.n_dense, generator=g)]
    for _ in model.feature_tables:
        out += [torch.randint(0, rows, (batch,), generator=g), torch.arange(batch + 1)]
    return tuple(out)


def _key(hw: HardwareSpec) -> str:
    return f"{isa.cpu_model()}|{mb.cores()} cores|{hw.threads} threads"


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def calibrate(hw: HardwareSpec, target: str, progress: bool = True) -> Fit:
    """Measure, fit, store; only meaningful for ``cpu-local`` (the machine that is measured)."""
    if hw.name != "cpu-local":
        raise RewriteError(f"calibration measures this machine: use --hardware cpu-local, not {hw.name}")
    if target not in TARGETS:
        raise RewriteError(f"calibration: unknown target {target!r} (choose {', '.join(TARGETS)})")
    if not target_available(target):
        raise RewriteError(f"calibration target {target}: onnxruntime is not installed")
    terms, ys, _ = measure(hw, target, progress)
    fit = fit_theta(terms, ys)
    store = _read(calibration_path())
    store.setdefault(_key(hw), {})[target] = {
        "theta": list(fit.theta), "points": fit.points, "median_rel_error": fit.median_rel_error,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_text(calibration_path(), json.dumps({"version": CALIBRATION_VERSION, "machines": store}, indent=1))
    return fit


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return dict(d["machines"]) if d.get("version") == CALIBRATION_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def stored_fit(hw: HardwareSpec, target: str) -> Fit | None:
    entry = _read(calibration_path()).get(_key(hw), {}).get(target)
    if hw.name != "cpu-local" or not entry:
        return None
    return Fit(tuple(entry["theta"]), int(entry["points"]), float(entry["median_rel_error"]))


def estimator_for(hw: HardwareSpec, target: str, calibrate_if_missing: bool = True,
                  progress: bool = True) -> Estimator:
    """The calibrated estimator for ``cpu-local`` (calibrating once if asked), else the
    uncalibrated one (presets, user specs)."""
    if hw.name != "cpu-local":
        return Estimator(hw)
    fit = stored_fit(hw, target)
    if fit is None and calibrate_if_missing and target_available(target):
        fit = calibrate(hw, target, progress)
    return Estimator(hw, fit.theta, "calibrated") if fit else Estimator(hw)
