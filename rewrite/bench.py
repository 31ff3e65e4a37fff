"""``rewrite bench``: throughput and latency of every path of a bundle against torch eager fp32.

Method (the machine is shared, so only ratios measured in the same run mean anything):
* each contender runs in its own process (no two thread pools in one process) and builds the
  same fresh serving batches (``rewrite.core.timing.serving_batches``: distinct batches, uniform ids),
  a set for the warm-up and one per round, so no timed call sees rows an earlier call left in
  the cache (this CPU's L3 is 480 MB);
* per batch size: one untimed warm-up pass per contender, then ``rounds`` passes in which the
  contenders take turns every ``TURN_SAMPLES`` samples (the others wait, blocked), so a burst of
  load from other jobs hits every contender alike, while each turn is long enough for a
  contender to run in the steady state of a serving process (call-by-call turns at B=2048 made
  every call start with another process's 2 GB working set in the TLB and L2: torch-fast on the
  Kaggle-shaped model 6.2 ms per call that way, 4.5 ms in turns of 8 calls);
* per contender and size: p50 / p99 of the per-call latencies, samples/s = B / p50;
* each contender's probabilities on one shared batch are compared with the baseline's.
Baseline: torch eager fp32 of the bundle's reference model (or ``--reference``).  Timed call:
``Predictor.predict(..., path=p, validate=False)`` for paths, ``sigmoid(model(...))`` for the
baseline; both include the per-feature split of the canonical batch, neither the input checks.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rewrite.core import isa
from rewrite.core.errors import RewriteError, VerificationError
from rewrite.cost.types import HardwareSpec

BASELINE = "torch-eager-fp32"
CALLS_PER_ROUND = 16384   # samples per contender per round and size, at most (B=1: 256 calls)
MAX_CALLS, MIN_CALLS = 256, 8


TURN_SAMPLES = 16384      # samples a contender runs before the next one takes its turn (8 calls at B=2048)


def calls_per_round(batch: int) -> int:
    return max(MIN_CALLS, min(MAX_CALLS, CALLS_PER_ROUND // batch))


def turn_calls(batch: int) -> int:
    """Calls per turn: TURN_SAMPLES samples' worth (a whole round at every batch size)."""
    return max(1, TURN_SAMPLES // batch)


def _make_call(spec: dict[str, Any], threads: int):
    """In the worker: a function (dense, indices, offsets) -> probabilities for one contender."""
    import torch

    torch.set_num_threads(threads)
    if spec["kind"] == "reference":
        from rewrite.formats import load

        model = load(spec["file"]).eval()

        @torch.inference_mode()
        def call(d, i, o):
            return torch.sigmoid(model(torch.from_numpy(d), torch.from_numpy(i), torch.from_numpy(o))).numpy()

        return call
    from rewrite.runtime import Predictor, load

    if spec["kind"] == "path":
        pred = load(spec["bundle"], threads=threads, check_files=False)
    else:                                      # a bundle written by the bench itself (fbgemm)
        pred = Predictor(_open(spec["bundle"]), threads)
    pred.runner(spec["path"])
    return lambda d, i, o: pred.predict(d, i, o, path=spec["path"], validate=False)


def _open(root):
    from rewrite.artifact import open_bundle

    return open_bundle(root, check_files=False)


def worker(conn, spec: dict[str, Any], threads: int, rows: list[int], n_dense: int,
           sizes: list[int], pooling: int, seed: int, rounds: int) -> None:
    """Contender process: answer ("time", B, lo, hi) with the seconds of each call on its fresh
    batches lo..hi of size B, ("probe",) with its outputs on one batch, ("stop",) by exiting."""
    try:
        from rewrite.core.timing import serving_batches, time_calls

        call = _make_call(spec, threads)
        batches = {b: serving_batches(rows, n_dense, b, calls_per_round(b) * (rounds + 1), seed, pooling)
                   for b in sizes}
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "probe":
                conn.send(("ok", call(*batches[sizes[-1]][0])))
            else:
                _, b, lo, hi = msg
                conn.send(("ok", time_calls(lambda x: call(*x), batches[b][lo:hi])))
    except Exception as e:  # reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def _fbgemm_contender(bundle, reference_file: Path, tmp: Path) -> tuple[dict[str, Any] | None, str | None]:
    """fbgemm's int8 TBE path lowered from the reference, when fbgemm_gpu loads and the bundle lacks it."""
    if "fbgemm-int8" in bundle.paths:
        return None, None
    from rewrite.bundling import compile_model
    from rewrite.formats import load
    from targets.base import get_target

    why = get_target("fbgemm-int8").unavailable()
    if why:
        return None, why
    try:
        compile_model(load(reference_file), tmp / "fbgemm", ["fbgemm-int8"], latency_sizes=())
    except VerificationError as e:     # built, but its outputs differ from the reference's: dropped
        return None, DROPPED + _failure(tmp / "fbgemm", "fbgemm-int8", e)
    except RewriteError as e:
        return None, str(e).replace(f"{tmp / 'fbgemm'}", "fbgemm-int8")   # name the path, not the temp folder
    return {"kind": "built", "bundle": str(tmp / "fbgemm"), "path": "fbgemm-int8"}, None


DROPPED = "failed verification against the reference: "


def _failure(root: Path, path: str, error: Exception) -> str:
    """Why ``path`` of the bundle at ``root`` failed verification, from its manifest when written."""
    try:
        return _manifest(root)["paths"][path]["verification"]["failure"]
    except (OSError, KeyError, ValueError):
        text = str(error).replace(f"{root}: ", "").replace(str(root), path)
        return text.removeprefix("path(s) failed verification and are not dispatched: ").removeprefix(f"{path}: ")


def _manifest(root: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(root) / "manifest.json").read_text())


def run_bench(bundle_dir: Path, batch_sizes: list[int], reference: Path | None = None, threads: int = 1,
              rounds: int = 5, pooling: int = 1, seed: int = 0, fbgemm: bool = True,
              hardware: HardwareSpec | None = None) -> dict[str, Any]:
    """Every verified path of the bundle (and fbgemm-int8 where it runs) against the baseline; with
    ``hardware``, each figure also as a share of the host's limit (``rewrite.cost.limit``)."""
    from rewrite.artifact import open_bundle

    bundle = open_bundle(bundle_dir)
    reference_file = Path(reference) if reference else bundle.reference_file()
    if not reference_file.is_file():
        raise RewriteError(f"--reference {reference_file}: no such file")
    if not batch_sizes or min(batch_sizes) < 1:
        raise RewriteError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    specs = {BASELINE: {"kind": "reference", "file": str(reference_file)}}
    for name in bundle.verified_paths():
        specs[name] = {"kind": "path", "bundle": str(bundle.root), "path": name}
    dropped = {name: f"{DROPPED}{p['verification'].get('failure', '')} (at compile time)"
               for name, p in bundle.paths.items() if not p["verification"]["passed"]}
    with tempfile.TemporaryDirectory(prefix="rewrite-bench-") as tmp:
        absent = {}
        if fbgemm:
            spec, why = _fbgemm_contender(bundle, reference_file, Path(tmp))
            if spec:
                specs["fbgemm-int8"] = spec
            elif why and why.startswith(DROPPED):
                dropped["fbgemm-int8"] = why
            elif why:
                absent["fbgemm-int8"] = why
        timings = _run_workers(specs, threads, bundle.table_rows(), bundle.n_dense, sorted(batch_sizes),
                               pooling, seed, rounds)
    report = _report(bundle, specs, timings, absent, dropped, threads, rounds, pooling, reference_file)
    if hardware is not None:
        add_limits(report, bundle, specs, hardware)
    return report


def add_limits(report: dict[str, Any], bundle, specs: dict[str, dict[str, Any]], hw: HardwareSpec) -> None:
    """Each result's ``limit_ms`` (the host's limit for its path's model and arithmetic at its
    batch) and ``of_limit`` = limit / p50; the method and the kernels behind it in ``limit``."""
    from rewrite.cost.limit import limit_fields, model_work
    from rewrite.formats import load

    reference = Path(specs[BASELINE]["file"])      # fbgemm-int8's model: the reference, tables in int8
    files = {name: bundle.reference_file(name) if name in bundle.paths else reference for name in specs}
    work = {f: model_work(load(f)) for f in set(files.values())}
    for r in report["results"]:
        r.update(limit_fields(work[files[r["path"]]], hw, r["precision"], r["batch"], r["p50_ms"],
                              report["lookups_per_bag"]))
    report["limit"] = {"hardware": hw.name, "source": hw.source, "notes": hw.notes,
                       "gemm_kernels": hw.measurements.get("gemm_kernels", {}),
                       "gather": "index_select and the fast engine's gather_bags, the faster per tier"
                                 if hw.measurements.get("engine_tier_row_s") else "the spec's tier latencies",
                       "method": "limit = gathers at the measured random-row rates + FLOPs at the measured "
                                 "peak of the path's arithmetic (rewrite.cost.limit); of_limit = limit / p50"}


def _run_workers(specs, threads, rows, n_dense, sizes, pooling, seed, rounds):
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    try:
        for name, spec in specs.items():
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(child, spec, threads, rows, n_dense, sizes, pooling, seed, rounds),
                            daemon=True)
            p.start()
            procs[name], conns[name] = p, parent
        for name in tqdm(specs, desc="loading contenders", file=sys.stderr, leave=False):
            _ask(conns[name], name, None)
        probes = {name: _ask(conns[name], name, ("probe",)) for name in specs}
        samples = {name: {b: [] for b in sizes} for name in specs}
        with tqdm(total=len(sizes) * rounds, desc="bench rounds", file=sys.stderr, leave=False) as bar:
            for b in sizes:
                n, step = calls_per_round(b), turn_calls(b)
                for name in specs:
                    _ask(conns[name], name, ("time", b, 0, n))       # warm-up, not recorded
                for r in range(1, rounds + 1):                        # round r: batches r*n .. (r+1)*n
                    for lo in range(r * n, (r + 1) * n, step):        # contenders take turns
                        for name in specs:
                            samples[name][b] += _ask(conns[name], name, ("time", b, lo, lo + step))
                    bar.update()
        return samples, probes
    finally:
        for name, c in conns.items():
            try:
                c.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _ask(conn, name: str, msg):
    if msg is not None:
        conn.send(msg)
    status, value = conn.recv()
    if status == "error":
        raise RewriteError(f"bench contender {name}: {value}")
    return value


def _report(bundle, specs, timings, absent, dropped, threads, rounds, pooling, reference_file) -> dict[str, Any]:
    samples, probes = timings
    base = probes[BASELINE].astype(np.float64)
    rows = []
    for name in specs:
        entry = bundle.paths.get(name, {})
        for b, secs in samples[name].items():
            ms = np.array(secs) * 1e3
            p50, p99 = float(np.median(ms)), float(np.percentile(ms, 99))
            bms = np.array(samples[BASELINE][b]) * 1e3
            b50 = float(np.median(bms))
            rows.append({"path": name, "target": entry.get("target", name if name != BASELINE else "torch"),
                         "precision": entry.get("precision", "int8-tables" if name == "fbgemm-int8" else "fp32"),
                         "batch": b, "samples_per_s": b / p50 * 1e3, "p50_ms": p50, "p99_ms": p99,
                         "calls": len(ms), "baseline_samples_per_s": b / b50 * 1e3, "baseline_p50_ms": b50,
                         "baseline_p99_ms": float(np.percentile(bms, 99)), "speedup": b50 / p50,
                         "max_abs_prob_diff_vs_baseline": float(np.abs(probes[name] - base).max())})
    return {"schema": "bench/1", "bundle": str(bundle.root), "baseline": BASELINE,
            "reference": str(reference_file), "host": isa.describe(), "threads": threads, "rounds": rounds,
            "lookups_per_bag": pooling, "throughput": "samples/s = batch / p50 latency",
            "results": rows, "absent": absent, "dropped": dropped}


def human(d: dict[str, Any]) -> str:
    """The text form of ``run_bench``'s result."""
    host = d["host"]
    lines = [f"{d['bundle']}: {d['threads']} thread(s), {d['rounds']} rounds, baseline {d['baseline']}",
             f"  host: {host['cpu']} ({host['arch']}), ISA tier {host['tier']} (host's highest: {host['host_tier']})",
             f"  {'path':<18}{'batch':>6}{'samples/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'vs eager':>9}"
             + (f"{'limit ms':>10}{'of limit':>9}" if "limit" in d else "")]
    for r in d["results"]:
        lines.append(f"  {r['path']:<18}{r['batch']:>6}{r['samples_per_s']:>12,.0f}{r['p50_ms']:>9.3f}"
                     f"{r['p99_ms']:>9.3f}{r['speedup']:>8.2f}x"
                     + (f"{r['limit_ms']:>10.3f}{r['of_limit']:>8.1%}" if "limit_ms" in r else ""))
    lines += [f"  {name}: dropped, {why}" for name, why in d.get("dropped", {}).items()]
    lines += [f"  {name}: absent ({why})" for name, why in d["absent"].items()]
    if "limit" in d:
        lim = d["limit"]
        kernels = ", ".join(f"{k}: {v}" for k, v in lim["gemm_kernels"].items())
        lines += [f"  host limit ({lim['hardware']}, {lim['source']}): {lim['method']}",
                  f"    GEMM peaks measured on {kernels or 'the spec'}; gathers: {lim['gather']}"]
    return "\n".join(lines)
