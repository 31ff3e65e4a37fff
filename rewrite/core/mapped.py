"""Tensors backed by a checkpoint file's pages: read lazily, handed back once used.

A tensor in a private mapping of a file (safetensors' ``safe_open``, ``torch.load(mmap=True)``,
a DCP chunk mapped by ``rewrite.formats.dcp``) costs no memory until its pages are touched.
Touched pages count in the process's RSS until the kernel reclaims them, which it does only under
memory pressure, so a command that reads every table once would show the whole checkpoint as
RSS.  ``release(t)`` drops t's whole pages from this process (``madvise(MADV_DONTNEED)``) when,
and only when, they lie in a private mapping of a regular file: the bytes stay in the page cache
and the next touch maps them again from the file.  Anywhere else (anonymous memory, where
DONTNEED would zero the data) it does nothing.  A private file mapping that was written to would
lose the writes: originals are never modified (the pass manager's contract).

Work over a large tensor goes in row blocks of about ``BLOCK_BYTES`` (``row_blocks``), so its
temporaries stay bounded however large the table is.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Iterator

import torch

BLOCK_BYTES = 64 << 20        # bytes of a table processed at once (temporaries scale with it)
PAGE = mmap.PAGESIZE


def row_blocks(rows: int, row_bytes: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """[lo, hi) row ranges of about ``block_bytes`` each, covering 0..rows (none when rows = 0)."""
    step = max(1, block_bytes // max(1, row_bytes))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


@torch.no_grad()
def abs_max(t: torch.Tensor) -> float:
    """max |t| over a floating tensor (0.0 when empty), in row blocks: no full-size temporary."""
    if t.numel() == 0:
        return 0.0
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    row_bytes = flat.shape[1] * flat.element_size()
    return max(float(flat[lo:hi].abs().max()) for lo, hi in row_blocks(flat.shape[0], row_bytes))


@torch.no_grad()
def all_finite(t: torch.Tensor) -> bool:
    """No inf or nan in ``t``, checked in row blocks."""
    if t.numel() == 0:
        return True
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    row_bytes = flat.shape[1] * flat.element_size()
    return all(bool(torch.isfinite(flat[lo:hi]).all()) for lo, hi in row_blocks(flat.shape[0], row_bytes))


def _private_file_ranges() -> list[tuple[int, int]]:
    """[start, end) of every private mapping of a regular file in this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or "p" not in parts[1] or parts[4] == "0" or not parts[5].startswith("/"):
                continue
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release(*tensors: torch.Tensor) -> int:
    """Drop the pages of ``tensors`` that lie in private file mappings from this process's RSS;
    returns the bytes released (0 off Linux, for anonymous memory, or below one page)."""
    if _libc is None:
        return 0
    spans = []
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        lo = -(-start // PAGE) * PAGE
        hi = (start + t.numel() * t.element_size()) // PAGE * PAGE
        if hi > lo:
            spans.append((lo, hi))
    if not spans:
        return 0
    released = 0
    ranges = _private_file_ranges()
    for lo, hi in spans:
        for a, b in ranges:
            s, e = max(lo, a), min(hi, b)
            if e > s and _libc.madvise(ctypes.c_void_p(s), ctypes.c_size_t(e - s), mmap.MADV_DONTNEED) == 0:
                released += e - s
    return released
