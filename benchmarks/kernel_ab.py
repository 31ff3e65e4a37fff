"""A/B of torch-fast's fused lookup against an earlier revision of ``dlrm_fast.cpp``, same tables.

    PYTHONPATH=. [REWRITE_ISA=avx2] python benchmarks/kernel_ab.py /tmp/kaggle/model.safetensors \
        --rev cfb8b05 [--api matrix|store] [-o benchmarks/results/kernel_ab.json]

Builds the old kernel at ``--rev`` for the active ISA tier (the flags today's build uses) beside
today's, checks both give bit-identical results on fp32 tables, then times ``gather_bags``,
``embed_interact`` and (``--api store``) ``embed_interact_q8`` at batch 2048, one thread, each
variant on fresh batches of its own (L3 would keep a batch's rows for whoever runs second),
alternating call by call; medians.  ``--api matrix``: a revision from before the byte buffer (W an
f32 [rows, d] matrix, ``base`` a row index); ``store``: one that takes today's arguments.  Needs
the revision in this git checkout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD_PATHS = ("targets/kernels", "targets/native/kernels")      # where the kernels lived, newest last


def old_kernels(rev: str, out: Path):
    """Build ``dlrm_fast.cpp`` as it was at ``rev``, with the whole kernels folder of that revision
    (its headers: ``quantize_row.h``, and ``dlrm_fast/*.h`` since the file was split)."""
    from torch.utils.cpp_extension import load

    for folder in reversed(OLD_PATHS):
        tree = subprocess.run(["git", "archive", rev, folder], cwd=ROOT, capture_output=True)
        if tree.returncode == 0:
            subprocess.run(["tar", "-x", "-C", str(out)], input=tree.stdout, check=True)
            source = out / folder / "dlrm_fast.cpp"
            if source.exists():
                break
    else:
        raise SystemExit(f"no dlrm_fast.cpp at {rev} under {' or '.join(OLD_PATHS)}")
    from rewrite.core import isa
    from targets.native.cpp_extension import FLAGS

    tier = isa.active_tier()
    return load(name=f"dlrm_fast_ab_{rev}_{tier}", sources=[str(source)], extra_cflags=FLAGS + isa.compile_flags(tier))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--rev", default="cfb8b05")
    ap.add_argument("--api", choices=("matrix", "store"), default="matrix",
                    help="the old revision's kernel arguments (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rewrite.core.timing import serving_batches
    from rewrite.formats import load
    from targets.native.engine import FusedTables
    from targets.native.fast_kernels import kernels

    with tempfile.TemporaryDirectory() as tmp:
        old = old_kernels(args.rev, Path(tmp))
    model = load(args.model).eval()
    t = FusedTables(model)
    w, feat, d = t.store.args()
    assert not feat[:, :2].any(), "fp32 row tables only (the old kernel reads nothing else)"
    table_rows = [model.embeddings[n].rows for n in model.feature_tables]

    def fresh(seed):
        return [(torch.from_numpy(i), torch.from_numpy(o)) for _, i, o in serving_batches(table_rows, 13, 2048, 8, seed)]

    x = torch.randn(2048, d)
    kp = -(-(d + (len(table_rows) + 1) * len(table_rows) // 2) // 32) * 32
    new, none = kernels(), torch.empty(0)
    fns = {"new gather_bags": lambda i, o: new.gather_bags(w, i, o, feat, d, none),
           "new embed_interact": lambda i, o: new.embed_interact(w, i, o, feat, d, none, x, 0, kp, False)}
    if args.api == "store":
        fns.update({"old gather_bags": lambda i, o: old.gather_bags(w, i, o, feat, d, none),
                    "old embed_interact": lambda i, o: old.embed_interact(w, i, o, feat, d, none, x, 0, kp, False),
                    "old embed_interact_q8": lambda i, o: old.embed_interact_q8(w, i, o, feat, d, none, x, 0, kp,
                                                                                False),
                    "new embed_interact_q8": lambda i, o: new.embed_interact_q8(w, i, o, feat, d, none, x, 0, kp,
                                                                                False)})
    else:
        weight = w[:w.numel() // (4 * d) * 4 * d].view(torch.float32).reshape(-1, d)
        old_w = old.huge_empty(weight.shape[0], d, False)
        old_w.copy_(weight)
        row_base, rows = feat[:, 2] // (4 * d), feat[:, 3]
        fns.update({"old gather_bags": lambda i, o: old.gather_bags(old_w, i, o, row_base, rows, False),
                    "old embed_interact": lambda i, o: old.embed_interact(old_w, i, o, row_base, rows, False, x, 0,
                                                                          kp, False)})
    fns = dict(sorted(fns.items(), key=lambda kv: kv[0].split(" ", 1)[::-1]))    # old and new of an op side by side
    check = fresh(3)[0]
    for op in {k.split(" ", 1)[1] for k in fns}:
        old_out, new_out = fns[f"old {op}"](*check), fns[f"new {op}"](*check)
        for a, b in zip(*(r if isinstance(r, (list, tuple)) else [r] for r in (old_out, new_out))):
            assert torch.equal(a.float(), b.float()), op
    own = {k: fresh(10 + n) for n, k in enumerate(fns)}
    secs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for j in range(8):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(*own[k][j])
                secs[k].append(time.perf_counter() - t0)
    from rewrite.core import isa

    result = {"schema": "kernel_ab/1", "rev": args.rev, "batch": 2048, "threads": 1, "host": isa.describe(),
              "ms": {k: float(np.median(v)) * 1e3 for k, v in secs.items()}}
    for k, ms in result["ms"].items():
        print(f"{k:22s} {ms:.3f} ms")
    if args.output:
        from rewrite.core.atomic import write_text

        write_text(args.output, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
