"""``rewrite.core.mapped``: row blocks, blockwise reductions, and ``release``, which drops only
file-backed private pages (never anonymous memory, whose data it would zero)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rewrite.core import mapped

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` mapped and resident in this process (its smaps Rss, all mappings)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_row_blocks_cover_every_row_once():
    assert list(mapped.row_blocks(10, 4, block_bytes=12)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(mapped.row_blocks(0, 4)) == []
    assert list(mapped.row_blocks(2, 100, block_bytes=1)) == [(0, 1), (1, 2)]   # at least a row a block


def test_blockwise_reductions(monkeypatch):
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (40,))
    t = torch.randn(101, 7)
    t[57, 3] = -9.5
    assert mapped.abs_max(t) == 9.5 and mapped.abs_max(torch.zeros(0, 3)) == 0.0
    assert mapped.all_finite(t)
    t[100, 6] = float("nan")
    assert not mapped.all_finite(t)


@linux
def test_release_drops_file_pages_and_keeps_the_data(tmp_path):
    path = tmp_path / "data.bin"
    data = np.arange(4 << 20, dtype=np.float32)            # 16 MiB
    data.tofile(path)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mm, dtype=torch.float32)
    assert float(t.sum()) == float(data.sum(dtype=np.float64))
    assert resident_bytes(path) >= 15 << 20
    assert mapped.release(t[1000:]) > 15 << 20
    assert resident_bytes(path) < 1 << 20
    assert torch.equal(t, torch.from_numpy(data)), "the data is read back from the file"


@linux
def test_release_leaves_anonymous_memory_alone():
    t = torch.arange(1 << 22, dtype=torch.float32)
    assert mapped.release(t) == 0
    assert torch.equal(t, torch.arange(1 << 22, dtype=torch.float32))


@linux
def test_blocks_release_the_pages_they_read(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    np.arange(4 << 20, dtype=np.float32).tofile(path)         # 16 MiB
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mm, dtype=torch.float32).view(-1, 1024)
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (1 << 20,))
    assert mapped.abs_max(t) == float((4 << 20) - 1)
    assert resident_bytes(path) < 3 << 20                     # at most about a block stays mapped


@linux
def test_file_pages_read_the_mapping_list_once_and_advise_only_inside_the_tensor(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    data = np.arange(4 << 20, dtype=np.float32)            # 16 MiB
    data.tofile(path)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mm, dtype=torch.float32).view(-1, 1024)
    anonymous = torch.arange(1 << 20, dtype=torch.float32)
    reads = []
    real = mapped._private_file_maps
    monkeypatch.setattr(mapped, "_private_file_maps", lambda: reads.append(1) or real())
    pages = mapped.FilePages(t, anonymous)
    assert pages and len(reads) == 1
    assert sum(e - s for s, e in pages.spans) == 16 << 20            # the file's pages, none of the anonymous
    float(t.sum())
    assert pages.advise(mmap.MADV_DONTNEED, within=t[:1024]) == 4 << 20   # a view: its own pages only
    assert 11 << 20 < resident_bytes(path) <= 12 << 20
    assert pages.advise(mmap.MADV_DONTNEED, within=anonymous) == 0
    assert len(reads) == 1, "advising reads no mapping list"
    assert not mapped.FilePages(anonymous) and not mapped.FilePages(torch.zeros(0))
    assert torch.equal(t.reshape(-1), torch.from_numpy(data)) and torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.float32))


@linux
def test_indexed_blocks_release_a_block_when_the_caller_stops_early(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    np.ones(4 << 20, dtype=np.float32).tofile(path)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mm, dtype=torch.float32).view(-1, 1024)
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (4 << 20,))
    got = []
    for lo, hi, block in mapped.indexed_blocks(t):
        got.append((lo, hi, float(block.sum())))
        if lo:
            break
    assert got == [(0, 1024, 1024.0 * 1024), (1024, 2048, 1024.0 * 1024)]
    assert resident_bytes(path) < 1 << 20


@linux
def test_spill_moves_large_tensors_to_a_mapped_scratch_file(tmp_path):
    from passes.quantized import RowwiseQuantizedBag

    rep, _ = RowwiseQuantizedBag.from_table(torch.randn(40_000, 64), 4)      # packed: 1.4 MB
    before = rep.packed.clone()
    idx, off = torch.tensor([0, 39_999, 7]), torch.tensor([0, 2, 3])
    expected = rep(idx, off)
    assert not mapped.is_mapped(rep.packed)
    assert mapped.spill(rep, str(tmp_path)) == before.numel()
    assert mapped.is_mapped(rep.packed) and torch.equal(rep.packed, before)
    assert not mapped.is_mapped(rep.exp_table)                # small, and not persistent: stays
    assert torch.equal(rep(idx, off), expected)
    assert list(tmp_path.iterdir()) == [], "the scratch file is unlinked"
    assert mapped.spill(rep, str(tmp_path)) == 0              # already mapped: nothing to move


def _uncached_mapping(path: Path, data: np.ndarray, offset: int) -> torch.Tensor:
    """``data`` written to ``path`` after ``offset`` bytes, its pages dropped from the page cache,
    mapped privately and viewed as [rows, 1024] from that offset (not page-aligned)."""
    with open(path, "wb") as f:
        f.write(b"\0" * offset)
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mm, dtype=torch.float32, offset=offset).view(-1, 1024)
    if mapped._missing_share(t) < mapped.DIRECT_MIN_MISSING:
        pytest.skip(f"{path.parent}'s file system keeps the file in memory: no read goes to the disk")
    return t


@linux
@pytest.mark.parametrize("refuse_direct", [False, True], ids=["o_direct", "file_system_refuses_o_direct"])
def test_blocks_out_of_the_page_cache_are_read_into_buffers(tmp_path, monkeypatch, refuse_direct):
    data = np.random.default_rng(0).standard_normal(3 << 20).astype(np.float32)     # 12 MiB
    t = _uncached_mapping(tmp_path / "data.bin", data, offset=4100)
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (1 << 20,))
    reads, real_read, real_preadv = [], mapped._DirectReads.read, os.preadv
    monkeypatch.setattr(mapped._DirectReads, "read", lambda self, *a: reads.append(self.direct) or real_read(self, *a))
    if refuse_direct:
        def preadv(fd, buffers, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)
        monkeypatch.setattr(os, "preadv", preadv)
    got = np.concatenate([block.numpy().reshape(-1).copy() for _, _, block in mapped.indexed_blocks(t)])
    assert np.array_equal(got, data)
    if refuse_direct:       # then plain reads; the kernel's read-ahead may cache later blocks first
        assert reads and reads[0] and not any(reads[1:])
    else:
        assert reads == [True] * 12, "every block came from the file, not from faulted-in pages"
    assert resident_bytes(tmp_path / "data.bin") < 1 << 20


@linux
def test_blocks_in_the_page_cache_are_read_through_the_mapping(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    data = np.arange(2 << 20, dtype=np.float32)
    data.tofile(path)                                       # just written: in the page cache
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mm, dtype=torch.float32).view(-1, 1024)
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (1 << 20,))
    monkeypatch.setattr(mapped._DirectReads, "read", lambda *a: pytest.fail("a cached block was read again"))
    assert mapped.abs_max(t) == float((2 << 20) - 1)
