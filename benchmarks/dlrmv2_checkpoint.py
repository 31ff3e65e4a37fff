"""Write an MLPerf-DLRMv2-shaped checkpoint as TorchRec would: a multi-rank DCP directory.

    PYTHONPATH=. python benchmarks/dlrmv2_checkpoint.py /tmp/dlrmv2/dcp --gib 8 --ranks 2

Shape (MLPerf inference/training DLRMv2, DLRM_DCN on Criteo 1TB, torchrec_dlrm's defaults): 26
tables of dim 128 with ``DLRMV2_ROWS`` rows (the training hash sizes, 40 M rows at most:
204 M rows, 104.6 GB fp32), bottom MLP 13-512-256-128, low-rank DCN over (26 + 1) · 128 = 3456
features with 3 layers of rank 512, top MLP 3456-1024-1024-512-256-1; multi-hot bags of
``MULTI_HOT`` ids per feature (the synthetic multi-hot Criteo dataset's sizes).  ``--gib`` scales
the row counts (``scaled_rows``) so the tables hold that many GiB.

Key layout of TorchRec's ``DLRMTrain(DLRM_DCN)`` state dict (``model.sparse_arch...``,
``model.inter_arch.crossnet.{W,V}_kernels.l``, ...).  Written by ``--ranks`` processes
(torch.multiprocessing, gloo on 127.0.0.1 through a file store) calling
``torch.distributed.checkpoint.save``: tables are sharded table-wise (whole tables, balanced by
bytes; rank r writes ``__r_0.distcp``), dense parameters are replicated (DCP keeps one copy).
A table's values depend only on (seed, table), so any rank count writes the same model; each
rank builds its tables in a scratch file it memory-maps, so writing needs no RAM for them.
Weights: table rows ~ N(0, 0.05²), Linear / cross W ~ N(0, 2 / (fan_in + fan_out)), biases
~ N(0, 1 / fan_out) (as ``benchmarks/kaggle_model.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

# MLPerf DLRMv2 (torchrec_dlrm, --num_embeddings_per_feature; 40 M cap): rows per table
DLRMV2_ROWS = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
               2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36)
# ids per bag of each feature (MLPerf DLRMv2's synthetic multi-hot Criteo, --multi_hot_sizes)
MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
DIM = 128
N_DENSE = 13
BOTTOM = (512, 256, DIM)
TOP = (1024, 1024, 512, 256, 1)
CROSS_LAYERS, CROSS_RANK = 3, 512
TABLE_STD = 0.05
PREFIX = "model."
TABLE_KEY = PREFIX + "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{}.weight"
BLOCK_ROWS = 1 << 16


def scaled_rows(gib: float, rows: tuple[int, ...] = DLRMV2_ROWS, dim: int = DIM) -> tuple[int, ...]:
    """Row counts holding ``gib`` GiB of fp32 tables: every count scaled by one factor (>= 1 row)."""
    scale = gib * (1 << 30) / (sum(rows) * dim * 4)
    return tuple(max(1, round(r * scale)) for r in rows)


def _gen(seed: int, table: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + table)


def table(seed: int, i: int, rows: int, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Table i's weights (into ``out`` if given), in row blocks: the same values whatever writes them."""
    out = torch.empty(rows, dim) if out is None else out
    gen = _gen(seed, i)
    for lo in range(0, rows, BLOCK_ROWS):
        out[lo:lo + BLOCK_ROWS].normal_(0.0, TABLE_STD, generator=gen)
    return out


def dense_state(n_tables: int, dim: int = DIM, bottom=BOTTOM, top=TOP, layers: int = CROSS_LAYERS,
                rank: int = CROSS_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every non-table tensor, in TorchRec's DLRM_DCN keys."""
    gen = _gen(seed, 999)
    state: dict[str, torch.Tensor] = {}

    def linear(key: str, fan_in: int, fan_out: int) -> None:
        state[key + "weight"] = torch.randn(fan_out, fan_in, generator=gen) * float(np.sqrt(2 / (fan_in + fan_out)))
        state[key + "bias"] = torch.randn(fan_out, generator=gen) * float(np.sqrt(1 / fan_out))

    widths = [N_DENSE, *bottom]
    for j, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        linear(f"{PREFIX}dense_arch.model._mlp.{j}._linear.", a, b)
    n = (n_tables + 1) * dim
    for layer in range(layers):
        std = float(np.sqrt(2 / (n + rank)))
        state[f"{PREFIX}inter_arch.crossnet.W_kernels.{layer}"] = torch.randn(n, rank, generator=gen) * std
        state[f"{PREFIX}inter_arch.crossnet.V_kernels.{layer}"] = torch.randn(rank, n, generator=gen) * std
        state[f"{PREFIX}inter_arch.crossnet.bias.{layer}"] = torch.randn(n, generator=gen) * float(np.sqrt(1 / n))
    widths = [n, *top]
    for j, (a, b) in enumerate(zip(widths[:-2], widths[1:-1])):
        linear(f"{PREFIX}over_arch.model.0._mlp.{j}._linear.", a, b)
    linear(f"{PREFIX}over_arch.model.1.", widths[-2], widths[-1])
    return state


def placement(rows: tuple[int, ...], ranks: int) -> list[int]:
    """Table -> rank, largest tables first onto the least loaded rank (table-wise sharding)."""
    load, owner = [0] * ranks, [0] * len(rows)
    for i in sorted(range(len(rows)), key=lambda i: -rows[i]):
        owner[i] = min(range(ranks), key=lambda r: load[r])
        load[owner[i]] += rows[i]
    return owner


def _worker(rank: int, ranks: int, out: str, rows: tuple[int, ...], dim: int, dense_kw: dict, seed: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=ranks)
    owner = placement(rows, ranks)
    mine = [i for i in range(len(rows)) if owner[i] == rank]
    with tempfile.TemporaryFile(dir=Path(out).parent) as scratch:
        total = sum(rows[i] for i in mine) * dim
        scratch.truncate(max(4, total * 4))
        buf = np.memmap(scratch, dtype=np.float32, mode="r+", shape=(max(1, total),))
        state = dense_state(len(rows), dim, seed=seed, **dense_kw)
        at = 0
        for i in mine:
            t = torch.from_numpy(buf[at:at + rows[i] * dim]).view(rows[i], dim)
            state[TABLE_KEY.format(i)] = table(seed, i, rows[i], dim, out=t)
            at += rows[i] * dim
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=out)
        dist.barrier()
        dist.destroy_process_group()
        del state, buf


def write(out: Path, rows: tuple[int, ...], ranks: int = 2, dim: int = DIM, seed: int = 0, **dense_kw) -> None:
    """The DCP directory ``out`` (must not exist), written by ``ranks`` processes."""
    import torch.multiprocessing as mp

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_worker, args=(ranks, str(out), tuple(rows), dim, dense_kw, seed), nprocs=ranks,
                           start_method="spawn")
    finally:
        Path(f"{out}.store").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path, help="the DCP directory to write (outside the repository)")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of fp32 tables")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.output.exists():
        print(f"{args.output}: already exists", file=sys.stderr)
        return 2
    rows = scaled_rows(args.gib)
    write(args.output, rows, args.ranks, seed=args.seed)
    size = sum(f.stat().st_size for f in args.output.iterdir())
    print(f"wrote {args.output} ({size / 1e9:.2f} GB in {len(os.listdir(args.output)) - 1} data files, "
          f"{sum(rows):,} rows x {DIM})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
