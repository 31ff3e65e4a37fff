"""Test-side references: Criteo TSV lines, TorchRec's parsing and its npy preprocessing, in plain
Python (after torchrec/datasets/criteo.py: ``tsv_to_npys`` row_mapper, int32 arrays,
``log(dense + 3)``, ``sparse % hashes``), sharing no code with ``rewrite``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

N_INT, N_CAT = 13, 26


def tsv_lines(n: int, rows: list[int], seed: int = 0, labeled: bool = True) -> list[str]:
    """Criteo-like lines: empty fields, -1/-2 counts, 8-digit hex ids (many >= 2**31), and for
    every feature one id that maps to its largest row under v mod rows."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints = [("" if rng.random() < 0.15 else str(int(rng.integers(-2, 3000)))) for _ in range(N_INT)]
        cats = []
        for f in range(N_CAT):
            v = int(rng.integers(0, 2**32))
            if i == f % n:  # the largest row under "mod", from a large hash value
                v = rows[f] * int(rng.integers(0, (2**32 - rows[f]) // rows[f])) + rows[f] - 1
            elif i == (f + 1) % n:  # the largest row under every mapping
                v = rows[f] - 1
            elif rng.random() < 0.1:
                cats.append("")
                continue
            cats.append(f"{v:08x}")
        label = [str(int(rng.random() < 0.3))] if labeled else []
        lines.append("\t".join(label + ints + cats) + "\n")
    return lines


def parse_line(line: str, labeled: bool = True):
    """TorchRec's row_mapper: missing values are 0 for both dense and sparse."""
    f = line.rstrip("\n").split("\t")
    off = 1 if labeled else 0
    label = int(f[0]) if labeled else None
    dense = [int(x or "0") for x in f[off:off + N_INT]]
    sparse = [int(x or "0", 16) for x in f[off + N_INT:]]
    return label, dense, sparse


def int32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def expected_rows(sparse: list[int], rows: list[int], mode: str) -> list[int]:
    if mode == "torchrec":
        return [int32(v) % r for v, r in zip(sparse, rows)]  # Python's % is numpy's for r > 0
    return [v % r for v, r in zip(sparse, rows)]


def log3(x: int) -> float:
    return math.log(x + 3)


def log1p(x: int) -> float:
    return math.log(max(x, 0) + 1)


def write_torchrec_npys(lines: list[str], prefix: Path) -> None:
    """What BinaryCriteoUtils.tsv_to_npys writes for these lines."""
    parsed = [parse_line(ln) for ln in lines]
    dense = np.array([[log3(x) for x in d] for _, d, _ in parsed], dtype=np.float32)
    sparse = np.array([[int32(v) for v in s] for _, _, s in parsed], dtype=np.int32)
    labels = np.array([[lab] for lab, _, _ in parsed], dtype=np.int32)
    for part, arr in (("dense", dense), ("sparse", sparse), ("labels", labels)):
        np.save(prefix.parent / f"{prefix.name}_{part}.npy", arr)


def torchrec_checkpoint(path: Path) -> list[int]:
    """A TorchRec DLRM state dict with 26 Criteo tables (t_cat_0..25) at ``path``; its rows."""
    import torch

    from tests.rewrite.formats.torchrec_ref import RefDLRM

    rows = [int(r) for r in np.random.default_rng(5).integers(2, 400, N_CAT)]
    ref = RefDLRM({f"t_cat_{i}": r for i, r in enumerate(rows)}, dim=4, n_dense=N_INT,
                  dense_sizes=[8, 4], over_sizes=[8, 1])
    torch.save(ref.state_dict(), path)
    return rows
