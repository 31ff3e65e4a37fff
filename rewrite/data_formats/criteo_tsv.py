"""Raw Criteo TSV (Kaggle ``train.txt``, Terabyte ``day_N[.gz]``), streamed.

Each line: label, 13 integer columns, 26 categorical columns as hexadecimal strings, separated
by tabs (39 fields, no label, in Kaggle's ``test.txt``: decided by the first line).  Empty
integer and categorical fields read as 0, as TorchRec's ``tsv_to_npys`` reads them.  A row whose
field count, label (0/1), integer or hex field does not parse is an error naming its line, or,
with ``skip_bad_rows``, is counted (``skipped_rows``) and skipped.

Parsing is vectorised per chunk of lines: the chunk is split once into a numpy string array
(rows with the wrong number of tabs are set aside first); integers parse
with ``astype(int64)``; hex strings are turned into digits by a 256-entry lookup table over
their bytes and folded (v = 16 v + digit) into uint64, so a row costs a split, not 39 ``int()``
calls.  The id mapping (``data_formats.common``) then gives row numbers.
"""

from __future__ import annotations

import gzip
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from rewrite.core.batch import Batch, batch_from_dense_ids
from rewrite.data_formats.common import IdMap, transform_dense
from rewrite.core.errors import RewriteError

N_INT, N_CAT = 13, 26
MAX_HEX_DIGITS = 16  # uint64
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_PAD = 16
_HEX[0] = _PAD  # numpy pads short byte strings with NULs


@dataclass
class Parsed:
    dense: np.ndarray          # int64 [n, 13] raw counts
    cat: np.ndarray            # uint64 [n, 26] int(hex, 16)
    labels: np.ndarray | None  # float32 [n]
    bad: dict[int, str]        # line number -> why the row was refused


def _row_problem(fields: list[str], n_fields: int, labeled: bool) -> str:
    """Why one row does not parse (the slow path, run only on rows the fast path refused)."""
    if len(fields) != n_fields:
        return f"expected {n_fields} tab-separated fields, found {len(fields)}"
    off = 1 if labeled else 0
    if labeled and fields[0] not in ("0", "1"):
        return f"label must be 0 or 1, found {fields[0]!r}"
    for k, v in enumerate(fields[off:off + N_INT]):
        try:
            int(v or "0")
        except ValueError:
            return f"integer column {k + 1} is {v!r}"
    for k, v in enumerate(fields[off + N_INT:]):
        if len(v) > MAX_HEX_DIGITS or any(c not in "0123456789abcdefABCDEF" for c in v):
            return f"categorical column {k + 1} is {v!r}, not a hexadecimal id"
    return "unparseable row"


def _hex(cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U-string array [n, 26] -> (uint64 values, per-row ok)."""
    n = cat.shape[0]
    try:
        raw = cat.astype("S")
    except UnicodeEncodeError:
        return np.zeros((n, N_CAT), np.uint64), np.zeros(n, bool)
    width = max(raw.dtype.itemsize, 1)
    digits = _HEX[np.ascontiguousarray(raw).view(np.uint8).reshape(n, N_CAT, width)]
    ok = ~(digits == 255).any(axis=(1, 2))
    if width > MAX_HEX_DIGITS:
        ok &= ~(digits[:, :, MAX_HEX_DIGITS:] != _PAD).any(axis=(1, 2))
        digits = digits[:, :, :MAX_HEX_DIGITS]
    value = np.zeros((n, N_CAT), np.uint64)
    for k in range(digits.shape[2]):
        d = digits[:, :, k]
        value = np.where(d < _PAD, value * np.uint64(16) + d.astype(np.uint64), value)
    return value, ok


def parse(lines: list[str], line_nos: np.ndarray, n_fields: int) -> Parsed:
    """Parse a chunk of lines (numbered ``line_nos``, 1-based); refused rows go to ``bad``."""
    labeled = n_fields == 1 + N_INT + N_CAT
    off = 1 if labeled else 0
    shaped = np.fromiter((ln.count("\t") == n_fields - 1 for ln in lines), bool, len(lines))
    good = np.flatnonzero(shaped)
    if len(good) == len(lines):  # one split of the whole chunk: about 2x faster than per line
        text = "".join(lines).replace("\r\n", "\n")
        fields = (text if text.endswith("\n") else text + "\n").replace("\n", "\t").split("\t")[:-1]
    else:
        fields = [v for i in good for v in lines[i].rstrip("\r\n").split("\t")]
    table = np.array(fields, dtype=str).reshape(len(good), n_fields)
    ok = np.ones(len(good), bool)
    if labeled:
        ok &= (table[:, 0] == "0") | (table[:, 0] == "1")
    ints = table[:, off:off + N_INT]
    ints = np.where(ints == "", "0", ints)
    try:
        dense = ints.astype(np.int64)
    except (ValueError, OverflowError):
        dense = np.zeros(ints.shape, np.int64)
        for i, row in enumerate(ints):
            try:
                dense[i] = row.astype(np.int64)
            except (ValueError, OverflowError):
                ok[i] = False
    cat, cat_ok = _hex(table[:, off + N_INT:])
    ok &= cat_ok
    refused = sorted(set(np.flatnonzero(~shaped).tolist()) | set(good[~ok].tolist()))
    bad = {int(line_nos[i]): _row_problem(lines[i].rstrip("\r\n").split("\t"), n_fields, labeled)
           for i in refused}
    labels = table[ok, 0].astype(np.float32) if labeled else None
    return Parsed(dense[ok], cat[ok], labels, bad)


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n")
    return open(path, encoding="utf-8", errors="replace", newline="\n")


@dataclass
class CriteoTSV:
    """A streamed Criteo TSV file; ``batches`` and ``id_chunks`` read it front to back."""

    path: Path
    labeled: bool
    dense_transform: str
    ids: IdMap
    skip_bad_rows: bool = False
    skipped_rows: int = field(default=0, init=False)
    n_dense: int = N_INT
    n_features: int = N_CAT

    @property
    def n_fields(self) -> int:
        return (1 if self.labeled else 0) + N_INT + N_CAT

    def _chunks(self, chunk: int, rate: float = 1.0, seed: int = 0, start: int = 0,
                limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> Iterator[Parsed]:
        """Parsed chunks of up to ``chunk`` lines; lines kept with probability ``rate``; ``shard``
        (k, N): only blocks i with i % N == k are parsed (the others are read, not parsed)."""
        self.skipped_rows = 0
        rng = np.random.default_rng(seed)
        seen = 0
        with _open_text(self.path) as f:
            numbered = itertools.islice(enumerate(f, 1), start, None)
            for i in itertools.count():
                if limit is not None and seen >= limit:
                    return
                block = list(itertools.islice(numbered, chunk if limit is None else min(chunk, limit - seen)))
                if not block:
                    return
                seen += len(block)
                if rate < 1:
                    block = [b for b, keep in zip(block, rng.random(len(block)) < rate) if keep]
                if i % shard[1] != shard[0]:
                    continue
                nos = np.fromiter((n for n, _ in block), np.int64, len(block))
                parsed = parse([ln for _, ln in block], nos, self.n_fields)
                if parsed.bad:
                    line = min(parsed.bad)
                    if not self.skip_bad_rows:
                        raise RewriteError(f"{self.path}:{line}: {parsed.bad[line]} (skip_bad_rows / "
                                           f"--skip-bad-rows counts and skips such rows)")
                    self.skipped_rows += len(parsed.bad)
                yield parsed

    def batches(self, batch_size: int, limit: int | None = None, shuffle_seed: int | None = None,
                start: int = 0) -> Iterator[Batch]:
        """Canonical batches of up to ``batch_size`` rows from lines [start, start + limit)."""
        if shuffle_seed is not None:
            raise RewriteError(f"{self.path}: a streamed TSV is read in order; convert it to "
                               f".npz or TorchRec .npy to shuffle")
        for p in self._chunks(batch_size, start=start, limit=limit):
            if len(p.dense):
                yield batch_from_dense_ids(transform_dense(p.dense, self.dense_transform),
                                           self.ids(p.cat), p.labels)

    def id_chunks(self, rate: float, seed: int = 0, chunk: int = 65536,
                  shard: tuple[int, int] = (0, 1)) -> Iterator[np.ndarray]:
        """Row numbers [n, 26] of a Bernoulli(rate) sample of the lines, chunk by chunk (``shard``
        (k, N): every N-th chunk from the k-th, as ``Dataset.id_chunks``)."""
        if not 0 < rate <= 1:
            raise RewriteError(f"sample rate must be in (0, 1], got {rate}")
        for p in self._chunks(chunk, rate, seed, shard=shard):
            yield self.ids(p.cat)


def open_tsv(path: Path, dense_transform: str, ids: IdMap, skip_bad_rows: bool) -> CriteoTSV:
    """Check the first line (40 fields: labeled, 39: not) and return the streamed reader."""
    try:
        with _open_text(path) as f:
            first = f.readline()
    except (OSError, EOFError) as e:
        raise RewriteError(f"{path}: unreadable ({e})") from None
    n = len(first.rstrip("\r\n").split("\t")) if first else 0
    if n not in (N_INT + N_CAT, 1 + N_INT + N_CAT):
        raise RewriteError(f"{path}:1: not Criteo TSV (or .npz / TorchRec .npy): expected 40 "
                           f"tab-separated fields (label, 13 integers, 26 hex ids) or 39 without "
                           f"the label, found {n}")
    return CriteoTSV(path, n == 1 + N_INT + N_CAT, dense_transform, ids, skip_bad_rows)
