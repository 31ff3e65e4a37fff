"""Tensors backed by a checkpoint file's pages: read lazily, handed back once used.

A tensor in a private mapping of a file (safetensors' ``safe_open``, ``torch.load(mmap=True)``,
a DCP chunk mapped by ``rewrite.formats.dcp``) costs no memory until its pages are touched.
Touched pages count in the process's RSS until the kernel reclaims them, which it does only under
memory pressure, so a command that reads every table once would show the whole checkpoint as
RSS.  ``release(t)`` drops t's whole pages from this process (``madvise(MADV_DONTNEED)``) when,
and only when, they lie in a private mapping of a regular file: the bytes stay in the page cache
and the next touch maps them again from the file.  Anywhere else (anonymous memory, where
DONTNEED would zero the data) it does nothing.  ``expect_random`` / ``expect_sequential`` tell
the kernel how the pages will be read: lookups at random (read each page alone, no read-ahead)
or a whole table front to back.  A private file mapping that was written to would
lose the writes: originals are never modified (the pass manager's contract).

Work over a large tensor goes in row blocks of about ``BLOCK_BYTES`` (``row_blocks``,
``blocks``), so its temporaries and its resident pages stay bounded however large the table is.
``spill`` moves a rewritten table out of anonymous memory into a scratch file it then maps, so
the results of a run over a larger-than-memory checkpoint do not pile up in RSS either.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

BLOCK_BYTES = 64 << 20        # bytes of a table processed at once (temporaries scale with it)
PAGE = mmap.PAGESIZE


def row_blocks(rows: int, row_bytes: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """[lo, hi) row ranges of about ``block_bytes`` each, covering 0..rows (none when rows = 0)."""
    step = max(1, block_bytes // max(1, row_bytes))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def _touch(block: torch.Tensor) -> None:
    """Fault in ``block``'s pages: one byte read per page (torch releases the GIL meanwhile)."""
    flat = block.reshape(-1).view(torch.uint8)
    flat[::PAGE].sum()


@functools.lru_cache(maxsize=1)
def _reader() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewrite-read-ahead")


DIRECT_ALIGN = 4096            # O_DIRECT: file offset, length and buffer aligned to the logical block
DIRECT_MIN_MISSING = 0.25      # a block read with O_DIRECT when this share of its pages is not cached


def _missing_share(block: torch.Tensor) -> float:
    """Share of ``block``'s whole pages that are not in the page cache (``mincore``)."""
    span = _whole_pages(block)
    if span is None:
        return 0.0
    n = (span[1] - span[0]) // PAGE
    vec = (ctypes.c_ubyte * n)()
    if _libc.mincore(ctypes.c_void_p(span[0]), ctypes.c_size_t(span[1] - span[0]), vec) != 0:
        return 0.0
    return bytes(vec).count(0) / n


class _DirectReads:
    """Byte ranges of one file read into two reusable page-aligned buffers, with O_DIRECT where the
    file system allows it (else plain ``pread``): the disk's speed, without faulting in, caching
    and evicting every page of a file larger than memory (the 32 GB DLRMv2 DCP here: pages faulted
    in by a reader thread came at ~0.9 GB/s, O_DIRECT reads at ~2.7 GB/s)."""

    def __init__(self, path: str, largest: int):
        size = -(-(largest + 2 * DIRECT_ALIGN) // PAGE) * PAGE
        self.buffers = [mmap.mmap(-1, size), mmap.mmap(-1, size)]
        self.path = path
        try:
            self.fd, self.direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            self.fd, self.direct = os.open(path, os.O_RDONLY), False

    def read(self, which: int, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the file, as uint8 in buffer ``which`` (valid until
        that buffer is read into again)."""
        lo = offset // DIRECT_ALIGN * DIRECT_ALIGN
        want = -(-(offset + nbytes - lo) // DIRECT_ALIGN) * DIRECT_ALIGN
        view = memoryview(self.buffers[which])
        done = 0
        while done < offset + nbytes - lo:
            try:
                got = os.preadv(self.fd, [view[done:want]], lo + done)
            except OSError as e:
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                os.close(self.fd)      # the file system refuses O_DIRECT for this range: read plainly
                self.fd, self.direct = os.open(self.path, os.O_RDONLY), False
                continue
            if got == 0:
                raise OSError(errno.EIO, f"unexpected end of file reading {nbytes} bytes at {offset}")
            done += got
        return torch.frombuffer(self.buffers[which], dtype=torch.uint8, count=nbytes, offset=offset - lo)

    def close(self) -> None:
        os.close(self.fd)


def indexed_blocks(t: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, block)`` over ``t``'s rows in blocks of about ``BLOCK_BYTES``, ``block`` holding
    the values of ``t[lo:hi]`` and valid until the next step (a reused buffer where ``t`` is mapped
    from a file); each block's file-backed pages released once the caller is done with it (also
    when the caller stops early) and marked for lookups: a table is read front to back with at
    most two blocks resident.  Where ``t`` is mapped from a file, a reader thread fetches the next
    block while the caller works on this one, so the disk and the work overlap: a block mostly in
    the page cache is faulted in (one byte per page), any other is read from the file into a
    buffer with O_DIRECT (``_DirectReads``).  The mapping list is read once for the whole table
    (``FilePages``)."""
    if t.numel() == 0:
        return
    pages = FilePages(t)
    row_bytes = t[0].numel() * t.element_size()
    spans = list(row_blocks(t.shape[0], row_bytes))
    where = pages.file_of(t) if pages and t.is_contiguous() else None
    direct = _DirectReads(where[0], max(hi - lo for lo, hi in spans) * row_bytes) if where else None
    pages.advise(mmap.MADV_SEQUENTIAL)     # the table's advice changes twice, not per block: each
                                           # change splits the mapping, and the list grows

    def fetch(k: int) -> torch.Tensor | None:
        """Block k read into a buffer, or None once its mapped pages are faulted in."""
        block = t[spans[k][0]:spans[k][1]]
        if direct is not None and _missing_share(block) >= DIRECT_MIN_MISSING:
            raw = direct.read(k % 2, where[1] + spans[k][0] * row_bytes, (spans[k][1] - spans[k][0]) * row_bytes)
            return raw.view(t.dtype).view(block.shape)
        _touch(block)
        return None

    def read_ahead(k: int):
        return _reader().submit(fetch, k) if pages and k < len(spans) else None

    ahead = read_ahead(0)
    try:
        for k, (lo, hi) in enumerate(spans):
            fetched = ahead.result() if ahead is not None else None
            ahead = read_ahead(k + 1)
            mapped_block = t[lo:hi]
            try:
                yield lo, hi, mapped_block if fetched is None else fetched
            finally:
                if fetched is None:
                    pages.advise(mmap.MADV_DONTNEED, within=mapped_block)
    finally:
        if ahead is not None:      # the caller stopped early: the reader is done with t first
            ahead.result()
        pages.advise(mmap.MADV_DONTNEED, mmap.MADV_RANDOM)
        if direct is not None:
            direct.close()


def blocks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t`` as row blocks (views, ``indexed_blocks``), a 1-d tensor as [n, 1]."""
    if t.numel() == 0:
        return
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    for _, _, block in indexed_blocks(flat):
        yield block


@torch.no_grad()
def abs_max(t: torch.Tensor) -> float:
    """max |t| over a floating tensor (0.0 when empty), in row blocks: no full-size temporary."""
    return max((float(b.abs().max()) for b in blocks(t)), default=0.0)


@torch.no_grad()
def all_finite(t: torch.Tensor) -> bool:
    """No inf or nan in ``t``, checked in row blocks."""
    return all(bool(torch.isfinite(b).all()) for b in blocks(t))


def _private_file_maps() -> list[tuple[int, int, str, int]]:
    """(start, end, path, file offset of start) of every private mapping of a regular file in
    this process (one read of ``/proc/self/maps``: ~3 ms with torch's libraries loaded, more once
    advice has split a large mapping into many areas)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(maxsplit=5)
            if len(parts) < 6 or "p" not in parts[1] or parts[4] == "0" or not parts[5].startswith("/"):
                continue
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16), parts[5], int(parts[2], 16)))
    return out


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _whole_pages(t: torch.Tensor) -> tuple[int, int] | None:
    """[lo, hi) of the whole pages inside ``t``'s bytes (None: on another device, or under a page)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return None
    start = t.data_ptr()
    lo, hi = -(-start // PAGE) * PAGE, (start + t.numel() * t.element_size()) // PAGE * PAGE
    return (lo, hi) if hi > lo else None


def _overlaps(spans, lo: int, hi: int) -> list[tuple[int, int]]:
    return [(max(a, lo), min(b, hi)) for a, b in spans if min(b, hi) > max(a, lo)]


class FilePages:
    """The whole pages of ``tensors`` that lie in private mappings of regular files, found with one
    read of ``/proc/self/maps`` (~3 ms with torch's libraries loaded: once per table, not per block
    or per bag chunk).  Valid while the tensors live: a live tensor's bytes can be neither
    unmapped nor moved, and only pages inside the tensors' own bytes are ever advised."""

    def __init__(self, *tensors: torch.Tensor):
        own = [p for t in tensors if (p := _whole_pages(t)) is not None]
        self.maps = _private_file_maps() if own and _libc is not None else []
        ranges = [(lo, hi) for lo, hi, _, _ in self.maps]
        self.spans = [s for lo, hi in own for s in _overlaps(ranges, lo, hi)]

    def file_of(self, t: torch.Tensor) -> tuple[str, int] | None:
        """(path, byte offset) of ``t``'s first byte in the file whose private mapping holds all of
        ``t`` (advice splits a mapping into several areas: its first and last byte must map the
        same file at offsets ``t``'s size apart); None when it lies in none, or the file has no
        name left (a spill)."""
        first = t.data_ptr()
        last = first + t.numel() * t.element_size() - 1
        at = [next(((path, off + a - lo) for lo, hi, path, off in self.maps if lo <= a < hi), None)
              for a in (first, last)]
        if at[0] is None or at[1] is None or at[0][0] != at[1][0] or at[0][0].endswith(" (deleted)"):
            return None
        return at[0] if at[1][1] - at[0][1] == last - first else None

    def __bool__(self) -> bool:
        return bool(self.spans)

    def advise(self, *advice: int, within: torch.Tensor | None = None) -> int:
        """``madvise(a)`` for each a in ``advice``, in order, on these pages (only those inside
        ``within``'s bytes when given: a view of one of the tensors); bytes advised."""
        spans = self.spans
        if within is not None:
            own = _whole_pages(within)
            spans = _overlaps(spans, *own) if own is not None else []
        done = 0
        for s, e in spans:
            if all(_libc.madvise(ctypes.c_void_p(s), ctypes.c_size_t(e - s), a) == 0 for a in advice):
                done += e - s
        return done


def release(*tensors: torch.Tensor) -> int:
    """Drop the pages of ``tensors`` that lie in private file mappings from this process's RSS
    (``MADV_DONTNEED``); returns the bytes released (0 off Linux, for anonymous memory, or below
    one page)."""
    return FilePages(*tensors).advise(mmap.MADV_DONTNEED)


def done_reading(*tensors: torch.Tensor) -> int:
    """``release`` then ``expect_random``: a block read front to back is handed back, and later
    reads of it are lookups."""
    return FilePages(*tensors).advise(mmap.MADV_DONTNEED, mmap.MADV_RANDOM)


def expect_random(*tensors: torch.Tensor) -> int:
    """Mark file-backed ``tensors`` as read at random (``MADV_RANDOM``): a lookup then faults in
    its own page only.  Without it each fault reads ahead up to megabytes around the row, and a
    few thousand verification lookups made whole tables resident (Kaggle-shaped file: 2.1 GB)."""
    return FilePages(*tensors).advise(mmap.MADV_RANDOM)


def expect_sequential(*tensors: torch.Tensor) -> int:
    """Mark file-backed ``tensors`` as about to be read front to back (``MADV_SEQUENTIAL``:
    aggressive read-ahead), as a pass fitting a whole table or a writer copying it does."""
    return FilePages(*tensors).advise(mmap.MADV_SEQUENTIAL)


LOOKUP_BAGS = 32    # bags pooled between releases when a representation is mapped from a file


@torch.no_grad()
def lookup(rep: torch.nn.Module, indices: torch.Tensor, offsets: torch.Tensor,
           pages: FilePages | None = None) -> torch.Tensor:
    """``rep(indices, offsets)``; when ``rep``'s tensors are mapped from a file, in chunks of
    ``LOOKUP_BAGS`` bags with its pages released after each: a lookup faults in a whole
    page-cache folio (~1.7 MB measured here), so a few thousand lookups would make a table
    resident.  Bags pool independently, so the result is the same.  ``pages``: ``rep``'s
    ``FilePages`` when the caller looks up the same table many times."""
    pages = FilePages(*rep.state_dict().values()) if pages is None else pages
    n = offsets.numel() - 1
    if n <= LOOKUP_BAGS or not pages:
        out = rep(indices, offsets)
        pages.advise(mmap.MADV_DONTNEED)
        return out
    outs = []
    for lo in range(0, n, LOOKUP_BAGS):
        off = offsets[lo:min(n, lo + LOOKUP_BAGS) + 1]
        outs.append(rep(indices[int(off[0]):int(off[-1])], off - off[0]))
        pages.advise(mmap.MADV_DONTNEED)
    return torch.cat(outs)


@torch.no_grad()
def logits_by_table(model, batches: list) -> list[torch.Tensor]:
    """``model(*b.inputs())`` for each batch, computed one table at a time: every batch's bags of a
    table pooled (``lookup``: a mapped table's pages released every few bags), then the MLPs and the
    interaction on the pooled embeddings (``RecModel.forward_pooled``: the same ops, the same
    logits).  Random lookups into a mapped table fault in whole page-cache folios (up to 2 MiB
    each on this host's ext4), so ``model(...)`` on a few thousand ids made whole tables resident;
    here at most one batch's lookups into one table are."""
    from rewrite.core.model import split_bags

    n = len(model.spec.features)
    bags = [split_bags(b.indices, b.offsets, n) for b in batches]
    pooled: list[list[torch.Tensor | None]] = [[None] * n for _ in batches]
    for name, rep in model.embeddings.items():
        features = [f for f, t in enumerate(model.feature_tables) if t == name]
        pages = FilePages(*rep.state_dict().values())
        for i, per_feature in enumerate(bags):
            for f in features:
                pooled[i][f] = lookup(rep, per_feature[2 * f], per_feature[2 * f + 1], pages)
    return [model.forward_pooled(b.dense, p) for b, p in zip(batches, pooled)]


SPILL_MIN_BYTES = 1 << 20     # tensors below this stay in memory


def is_mapped(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes lie in a private mapping of a file (a mapped checkpoint or a spill)."""
    if _libc is None or t.device.type != "cpu" or t.numel() == 0:
        return False
    return any(a <= t.data_ptr() < b for a, b, _, _ in _private_file_maps())


def map_back(f, start: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of open file ``f`` from ``start`` (just written and flushed) as a tensor of
    ``like``'s dtype and shape, backed by a private map of the file (clean, droppable pages)."""
    nbytes = like.numel() * like.element_size()
    base = start // PAGE * PAGE
    mm = mmap.mmap(f.fileno(), start + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start - base).view(like.dtype).view(like.shape)


def spill(module: torch.nn.Module, directory: str | None = None, into=None) -> int:
    """Move ``module``'s large state tensors (``SPILL_MIN_BYTES`` and up, not already mapped) into
    an unlinked scratch file in ``directory`` (default: the system's temporary directory) and back
    them by its pages instead of anonymous memory; returns the bytes moved.  The values are the
    same; the pages are clean and droppable once written back, so a run that rewrites every table
    of a larger-than-memory checkpoint holds none of its results in RSS.  The file disappears
    with the last tensor mapping it.  ``into``: the output being written
    (``rewrite.core.result_file.ResultFile``); a tensor its ``place`` takes (one in memory, or one
    already spilled to a scratch file) is backed by the output's pages instead."""
    big = {k: v for k, v in module.state_dict().items() if v.numel() * v.element_size() >= SPILL_MIN_BYTES}
    moved, total = {}, 0
    for k, v in big.items() if into is not None else ():
        placed = into.place(v)
        if placed is not None:
            moved[k] = placed
            total += v.numel() * v.element_size()
    big = {k: v for k, v in big.items() if k not in moved and not is_mapped(v)}
    if big:
        with tempfile.TemporaryFile(dir=directory, prefix="rewrite-spill-") as f:
            for k, v in big.items():
                raw = v.detach().contiguous().reshape(-1).view(torch.uint8)
                start = -(-f.seek(0, 2) // PAGE) * PAGE
                f.truncate(start)
                f.seek(start)
                f.write(memoryview(raw.numpy()))
                f.flush()
                moved[k] = map_back(f, start, v)
                total += raw.numel()
    if moved:
        module.load_state_dict(moved, strict=False, assign=True)
    return total
