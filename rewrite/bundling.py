"""``compile``: a RecModel -> a verified, measured bundle with a dispatch policy.

For each requested target: lower the model into the path's folder, load it back, compare it with
torch eager of the same model on ragged / empty / largest-id batches (``rewrite.verification``),
then time every verified path at a few batch sizes (fresh batches, one thread, paths alternating
round by round, median) and derive the dispatch policy from those latencies.  Passes plug in
before this step: ``compile_model(apply(model, passes), ..., original=model)``.
"""

from __future__ import annotations

import datetime
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rewrite.core import isa
from rewrite.dispatch import measured_ranges
from rewrite.artifact import (FORMAT, FORMAT_VERSION, REFERENCE_FILE, file_entry,
                              sha256_file, write_manifest)
from rewrite.core.atomic import atomic_path, check_new_output
from rewrite.core.errors import RewriteError, VerificationError
from rewrite.core.model_file import save
from rewrite.core.model import RecModel
from rewrite.core.synthetic import multi_hot_batch
from rewrite.core.timing import serving_batches, time_calls
from rewrite.verification import compare, reference_logits, synthetic_checks, table_rows
from targets.base import TARGETS, Target, get_target, require_available
from rewrite.core.batch import split_bags_np

AUTO = "auto"                  # every target usable here that accepts the model
DEFAULT_TARGETS = (AUTO,)
LATENCY_BATCH_SIZES = (1, 8, 64, 512, 2048)   # samples; where the compile-time latency is measured
LATENCY_ROUNDS = 3                         # alternating rounds; each times every fresh batch once
LATENCY_BATCHES = 4                        # fresh batches per round and size
REWRITTEN_FILE = "rewritten/model.safetensors"
LIBRARIES = ("dlrm-rewrite", "torch", "numpy", "onnx", "onnxruntime", "onnxscript", "safetensors",
             "fbgemm-gpu-cpu")


def resolve_targets(names: list[str]) -> list[Target]:
    """Targets by name, each available here (RewriteError naming the first that is not);
    ``["auto"]``: every registered target that can run here (``unavailable_here`` says why not)."""
    if names == [AUTO]:
        return [get_target(n) for n in TARGETS.names() if get_target(n).unavailable() is None]
    if AUTO in names:
        raise RewriteError("--target auto stands alone: it already means every target usable here")
    if len(set(names)) != len(names):
        raise RewriteError(f"--target: each target once, got {', '.join(names)}")
    return [require_available(get_target(n)) for n in names]


def unavailable_here() -> dict[str, str]:
    """Every registered target that cannot run on this host, with the reason."""
    return {n: why for n in TARGETS.names() if (why := get_target(n).unavailable())}


def check_output(out: Path, force: bool) -> None:
    """RewriteError unless ``out`` may be written: absent, or a bundle and ``force``."""
    check_new_output(out, force)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise RewriteError(f"{out}: exists and is not a bundle; refusing to replace it even with --force")


def tune_options(targets: list[Target], trials: int) -> dict[str, dict[str, Any]]:
    """``--tune N`` -> per-target options ``{name: {"tune_trials": N}}`` for the targets that tune;
    RewriteError when none of ``targets`` does."""
    tunable = [t.name for t in targets if getattr(t, "tunable", False)]
    if not tunable:
        raise RewriteError(f"--tune: target(s) {', '.join(t.name for t in targets)} do not "
                           "support tuning (tvm-llvm does)")
    return {name: {"tune_trials": trials} for name in tunable}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def measure_latency(runners: dict[str, Any], model: RecModel, sizes=LATENCY_BATCH_SIZES,
                    seed: int = 0) -> dict[str, dict[int, float]]:
    """Median ms per call of each runner at each batch size; runners alternate round by round."""
    n_features = len(model.spec.features)
    samples: dict[str, dict[int, list[float]]] = {p: {b: [] for b in sizes} for p in runners}
    for b in sizes:
        batches = [(d, split_bags_np(i, o, n_features)) for d, i, o in
                   serving_batches(table_rows(model), model.spec.n_dense, b, LATENCY_BATCHES, seed)]
        for r in runners.values():                      # warm-up: first calls allocate
            r(*batches[0])
        for _ in range(LATENCY_ROUNDS):
            for name, r in runners.items():
                samples[name][b] += time_calls(lambda x, r=r: r(*x), batches)
    return {p: {b: float(np.median(v)) * 1e3 for b, v in per.items()} for p, per in samples.items()}


def verification_inputs(model: RecModel):
    """(example batch for lowering, check batches, the model's eager logits on them)."""
    checks = synthetic_checks(model)
    return (multi_hot_batch(table_rows(model), 8, model.spec.n_dense, 2.0, seed=1), checks,
            reference_logits(model, checks))


def lower_path(target: Target, model: RecModel, root: Path, name: str, lowered_from: str,
               inputs, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """Lower ``model`` into ``root/name``, load it back, compare with eager on ``inputs``
    (from ``verification_inputs``): (the path's manifest entry, its runner or None if it failed)."""
    example, checks, expected = inputs
    folder = root / name
    folder.mkdir()
    compiled = target.lower(model, example, folder, **(options or {}))
    if target.native_code:
        compiled.options.setdefault("isa_tier", isa.active_tier())
    runner = target.load(folder, compiled, threads=1)
    verification = compare(runner, checks, expected, len(model.spec.features), target.tolerance)
    entry = {
        "target": target.name, "devices": list(target.devices), "precision": target.precision,
        "folder": name, "lowered_from": lowered_from,
        "representations": {n: r.describe() for n, r in model.embeddings.items()},
        "options": compiled.options,
        "files": [file_entry(root, f"{name}/{f}") for f in compiled.files],
        "embedding_bytes": compiled.options.get("embedding_bytes", model.embedding_bytes()),
        "dense_bytes": model.dense_bytes(),
        "verification": verification}
    return entry, runner if verification["passed"] else None


def manifest_head(model: RecModel, source: Path | None, root: Path) -> dict[str, Any]:
    """The manifest keys every bundle starts with (the reference must already be in ``root``)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.full_spec(),
        "source": {"path": str(source) if source else None,
                   "sha256": sha256_file(source) if source else None,
                   "format": model.spec.provenance.get("format")},
        "versions": library_versions(),
        "host": isa.describe(),          # the CPU and ISA tier it was compiled on (each load picks its own)
        "reference": file_entry(root, REFERENCE_FILE),
    }


def compile_model(model: RecModel, out: Path, target_names: list[str] | None = None,
                  source: Path | None = None, force: bool = False, original: RecModel | None = None,
                  latency_sizes=LATENCY_BATCH_SIZES, extra: dict[str, Any] | None = None,
                  target_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the bundle ``out`` (atomically) and return its manifest.

    ``original``: the model before passes (default: ``model``); stored as the bundle's reference.
    ``extra``: top-level manifest keys added as given (e.g. ``passes``).
    ``target_options``: keyword options per target name for its ``lower`` (e.g. tune_trials).
    Raises RewriteError before writing anything for an unknown/unavailable target or an existing
    ``out`` without ``force``; VerificationError (after writing) if a path failed verification.
    """
    out = Path(out)
    names = list(target_names or DEFAULT_TARGETS)
    targets = resolve_targets(names)
    auto = names == [AUTO]
    skipped = unavailable_here() if auto else {}
    check_output(out, force)
    model = model.eval()
    torch.set_num_threads(1)
    example, checks, expected = verification_inputs(model)
    paths: dict[str, dict[str, Any]] = {}
    runners = {}
    with atomic_path(out, directory=True) as tmp:
        save(original if original is not None else model, tmp / REFERENCE_FILE)
        lowered_from = REFERENCE_FILE
        if original is not None and original is not model:
            save(model, tmp / REWRITTEN_FILE)
            lowered_from = REWRITTEN_FILE
        for target in tqdm(targets, desc="lowering", unit="path", file=sys.stderr, leave=False):
            try:
                paths[target.name], runner = lower_path(target, model, tmp, target.name, lowered_from,
                                                        (example, checks, expected),
                                                        (target_options or {}).get(target.name, {}))
            except RewriteError as e:                 # the target refuses this model
                if not auto:
                    raise
                skipped[target.name] = str(e)
                shutil.rmtree(tmp / target.name, ignore_errors=True)
                continue
            if runner is not None:
                runners[target.name] = runner
        if not paths:
            raise RewriteError("no target accepted the model: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
        latency = measure_latency(runners, model, latency_sizes) if runners else {}
        for name, per in latency.items():
            paths[name]["latency_ms"] = {str(b): ms for b, ms in per.items()}
        for entry in paths.values():
            entry["footprint_bytes"] = sum(f["bytes"] for f in entry["files"])
        runners.clear()
        manifest = {
            **manifest_head(model, source, tmp),
            **({"rewritten": file_entry(tmp, REWRITTEN_FILE)} if lowered_from == REWRITTEN_FILE else {}),
            "paths": paths,
            **({"skipped_targets": skipped} if auto else {}),
            "dispatch": {**measured_ranges(latency, next(iter(paths))),
                         "threads": 1, "measured": "compile time, one process, 1 thread"},
            **(extra or {}),
        }
        write_manifest(tmp, manifest)
    failed = {n: p["verification"]["failure"] for n, p in paths.items() if not p["verification"]["passed"]}
    if failed:
        raise VerificationError(f"{out}: path(s) failed verification and are not dispatched: "
                                + "; ".join(f"{n}: {why}" for n, why in failed.items()))
    return manifest
