"""Checkpoints larger than memory: peak RSS and wall time of ``rewrite apply`` and ``compile``.

    PYTHONPATH=. python benchmarks/large_checkpoint.py --gib 8 --workdir /tmp/large \
        -o benchmarks/results/large_checkpoint.json
    PYTHONPATH=. python benchmarks/large_checkpoint.py --gib 0 --kaggle /tmp/kaggle/model.safetensors \
        --baseline-tree /tmp/before -o benchmarks/results/large_checkpoint_kaggle.json

DLRMv2-shaped (``--gib`` > 0): writes an MLPerf-DLRMv2-shaped DCP directory of that many GiB of
fp32 tables from ``--ranks`` gloo processes (``benchmarks/dlrmv2_checkpoint.py``), times reading
it once, then runs as subprocesses, one at a time:

    rewrite apply DCP -p quantize:bits=4 -o q4.safetensors --json
    rewrite compile q4.safetensors --target torch-fast -o bundle --json

and records each command's wall time and peak RSS (``os.wait4``'s ``ru_maxrss`` of that child).
Reading the file once: this job cannot drop the page cache (not root), so both numbers are
given: ``o_direct_s`` reads every data file with O_DIRECT (bypassing the cache: the disk's
speed) and ``cached_s`` reads them through the cache right after they were written (what the
commands meet when the file fits in the cache).  Goals (issue 20): apply peak RSS <= 4 GB and
wall <= 2x one read (O_DIRECT); compile peak RSS <= 1.3x the result's size.

Kaggle-shaped (``--kaggle FILE``, written by ``benchmarks/kaggle_model.py``): the same two
commands on that file; goal apply + compile <= 5 min, each peak RSS <= 1.5x the checkpoint.

``--baseline-tree DIR`` runs the same commands with another checkout's code (``PYTHONPATH=DIR``)
in the same run, for before/after ratios (``--baseline-dlrmv2`` adds it to the DLRMv2 runs too,
where the code before issue 20 holds the whole checkpoint in memory).  The C++ kernels are built
once before any timing.  Files are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
DIRECT_BLOCK = 8 << 20         # bytes per O_DIRECT read (a multiple of the 4 KiB logical block)


def run(cmd: list[str], tree: Path) -> dict[str, Any]:
    """Run ``cmd`` with ``PYTHONPATH=tree``: wall seconds, peak RSS (bytes), exit code, its JSON."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    return {"command": " ".join(cmd), "tree": str(tree), "exit_code": proc.returncode, "wall_s": round(wall, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "report": report}


def rewrite_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rewrite.cli", *args]


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def read_direct(paths: list[Path]) -> float:
    """Seconds to read every byte of ``paths`` with O_DIRECT (page cache bypassed)."""
    buf = mmap.mmap(-1, DIRECT_BLOCK)           # page-aligned, as O_DIRECT needs
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            while os.readv(fd, [buf]) == DIRECT_BLOCK:
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def read_cached(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(DIRECT_BLOCK):
                pass
    return time.perf_counter() - t0


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in files_of(path))


def apply_and_compile(source: Path, work: Path, trees: dict[str, Path]) -> dict[str, Any]:
    """``apply -p quantize:bits=4`` then ``compile --target torch-fast`` of ``source`` per code tree."""
    out: dict[str, Any] = {}
    for name, tree in trees.items():
        q4, bundle = work / f"q4-{name}.safetensors", work / f"bundle-{name}"
        print(f"[{name}] apply {source} ...", file=sys.stderr, flush=True)
        applied = run(rewrite_cmd("apply", str(source), "-p", "quantize:bits=4", "-o", str(q4), "--json",
                                  "--force"), tree)
        result = {"apply": applied, "result_bytes": q4.stat().st_size if q4.exists() else None}
        if applied["exit_code"] == 0:
            print(f"[{name}] compile {q4} ...", file=sys.stderr, flush=True)
            result["compile"] = run(rewrite_cmd("compile", str(q4), "--target", "torch-fast", "-o", str(bundle),
                                                "--json", "--force"), tree)
            result["compile"]["verified"] = (result["compile"]["exit_code"] == 0 and result["compile"]["report"]
                                             ["paths"]["torch-fast"]["verification"]["passed"])
            result["compile"]["report"] = {"latency_ms": (result["compile"]["report"] or {}).get("paths", {})
                                           .get("torch-fast", {}).get("latency_ms")}
        if applied["report"]:
            rep = applied["report"]
            applied["report"] = {k: rep.get(k) for k in ("tables_rewritten", "embedding_bytes_before",
                                                          "embedding_bytes_after", "max_abs_logit_diff", "written")}
        out[name] = result
        shutil.rmtree(bundle, ignore_errors=True)
    for name in trees:
        q4 = work / f"q4-{name}.safetensors"
        if name != "current" and q4.exists() and (work / "q4-current.safetensors").exists():
            out[name]["result_identical_to_current"] = filecmp.cmp(q4, work / "q4-current.safetensors", shallow=False)
            out[name]["result_same_tensors_as_current"] = same_tensors(q4, work / "q4-current.safetensors")
    return out


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same metadata and tensors, whatever their layout
    (``apply`` writes tables where it made them: ``rewrite.core.result_file``)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def ratios(runs: dict[str, Any]) -> dict[str, Any]:
    """current / baseline of wall time and peak RSS, per command."""
    if "baseline" not in runs:
        return {}
    out = {}
    for cmd in ("apply", "compile"):
        a, b = runs["current"].get(cmd), runs["baseline"].get(cmd)
        if a and b and a["exit_code"] == b["exit_code"] == 0:
            out[cmd] = {"peak_rss_current_over_baseline": round(a["peak_rss_bytes"] / b["peak_rss_bytes"], 3),
                        "wall_current_over_baseline": round(a["wall_s"] / b["wall_s"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0, help="GiB of fp32 tables in the DLRMv2-shaped DCP (0: skip)")
    ap.add_argument("--ranks", type=int, default=2, help="processes writing the DCP (one .distcp each)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/large_checkpoint"))
    ap.add_argument("--kaggle", type=Path, help="a Kaggle-shaped model (benchmarks/kaggle_model.py) to measure too")
    ap.add_argument("--baseline-tree", type=Path, help="another checkout to run the same commands with")
    ap.add_argument("--baseline-dlrmv2", action="store_true", help="run the baseline on the DLRMv2 DCP too")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and results")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks/results/large_checkpoint.json")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from benchmarks import dlrmv2_checkpoint as v2
    from rewrite.core import isa

    trees = {"current": ROOT, **({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})}
    for name, tree in trees.items():        # build the C++ kernels once, outside every timing
        subprocess.run([sys.executable, "-c", "from targets.native.fast_kernels import kernels; kernels()"],
                       cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"host": isa.describe(), "load_average": os.getloadavg(),
                              "command": " ".join(sys.argv), "goals": {}}
    try:
        if args.gib > 0:
            dcp = args.workdir / f"dlrmv2-{args.gib:g}gib"
            if not dcp.exists():
                print(f"writing {dcp} ({args.gib:g} GiB, {args.ranks} ranks) ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                v2.write(dcp, v2.scaled_rows(args.gib), args.ranks)
                write_s = time.perf_counter() - t0
            else:
                write_s = None
            files = files_of(dcp)
            read = {"cached_s": round(read_cached(files), 2), "o_direct_s": round(read_direct(files), 2)}
            read["cached_s_again"] = round(read_cached(files), 2)
            runs = apply_and_compile(dcp, args.workdir, trees if args.baseline_dlrmv2 else {"current": ROOT})
            cur = runs["current"]
            result["dlrmv2"] = {"gib": args.gib, "checkpoint_bytes": size_of(dcp), "ranks": args.ranks,
                                "data_files": [p.name for p in files], "write_s": write_s and round(write_s, 1),
                                "read_once": read, "runs": runs, "ratios": ratios(runs)}
            compile_rss = cur.get("compile", {}).get("peak_rss_bytes")
            result["goals"]["dlrmv2"] = {
                "apply_peak_rss_le_4GB": cur["apply"]["peak_rss_bytes"] <= 4 * GB,
                "apply_wall_over_o_direct_read": round(cur["apply"]["wall_s"] / read["o_direct_s"], 2),
                "apply_wall_le_2x_read": cur["apply"]["wall_s"] <= 2 * read["o_direct_s"],
                "apply_wall_over_cached_read": round(cur["apply"]["wall_s"] / read["cached_s"], 2),
                "compile_rss_over_result": compile_rss and round(compile_rss / cur["result_bytes"], 3),
                "compile_rss_le_1.3x_result": bool(compile_rss and compile_rss <= 1.3 * cur["result_bytes"]),
                "larger_than_memory": size_of(dcp) > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")}
        if args.kaggle:
            runs = apply_and_compile(args.kaggle, args.workdir, trees)
            size = size_of(args.kaggle)
            cur = runs["current"]
            result["kaggle"] = {"checkpoint": str(args.kaggle), "checkpoint_bytes": size, "runs": runs,
                                "ratios": ratios(runs)}
            total = cur["apply"]["wall_s"] + cur.get("compile", {}).get("wall_s", float("inf"))
            peak = max(cur["apply"]["peak_rss_bytes"], cur.get("compile", {}).get("peak_rss_bytes", 0))
            result["goals"]["kaggle"] = {"apply_plus_compile_s": round(total, 1), "le_5_min": total <= 300,
                                         "peak_rss_over_checkpoint": round(peak / size, 3),
                                         "peak_rss_le_1.5x": peak <= 1.5 * size}
    finally:
        if not args.keep:
            for p in args.workdir.glob("dlrmv2-*"):
                shutil.rmtree(p, ignore_errors=True)
            for p in args.workdir.glob("q4-*.safetensors"):
                p.unlink()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
