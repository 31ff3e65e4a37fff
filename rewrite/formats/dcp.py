"""``torch.distributed.checkpoint`` (DCP) directories -> one state dict of dense tensors.

A DCP directory holds ``.metadata`` (a pickle of ``Metadata``: every key's global size, dtype
and chunks) and one ``__{rank}_{i}.distcp`` file per writer with the chunks.  Sharded tables
(row-, column- or table-wise, from any number of ranks) are reassembled into full tensors
in this process, with no process group: a tensor saved as one chunk is
mapped from its data file in place, one in several chunks is assembled from them.

Nothing from the directory runs: ``.metadata`` is read with a restricted unpickler that
resolves only DCP's metadata dataclasses, ``torch.Size`` and torch dtype/layout/memory-format
constants, the last by name (any other global is refused by name); tensor chunks are read with
``torch.load(weights_only=True)`` (their geometry, ``map_location="meta"``) and mapped in place
(``load_state_dict``), or by DCP's ``FileSystemReader``, which also loads with
``weights_only=True``; non-tensor entries (step counters, strings), which DCP stores as
arbitrary pickles, are not read at all.
"""

from __future__ import annotations

import io
import mmap
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as md

from rewrite.core.errors import RewriteError
from rewrite.core.mapped import release

METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    (f"{_DCP}.metadata", name): getattr(md, name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")
}


def _layout(name: str) -> torch.layout:
    """torch.layout by its repr ("torch.strided"), as ``torch.serialization._get_layout`` does."""
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise _Refused(f"torch layout {name!r}")
    return layout


def _path_text(*parts: str) -> str:
    return "/".join(str(p) for p in parts)


def _storage_info():
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (message: its name)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP ``.metadata`` pickle legitimately names."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == (f"{_DCP}.filesystem", "_StorageInfo"):
            return _storage_info()
        if module == "torch" and name == "Size":
            return torch.Size
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "Path"):
            return _path_text  # StorageMeta.checkpoint_id: keep the text, build no path object
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise _Refused(f"{module}.{name}")


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def read_metadata(path: Path) -> md.Metadata:
    try:
        with open(path / METADATA_FILE, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise RewriteError(f"{path / METADATA_FILE}: names {e}, which a DCP metadata file does not "
                           f"need; refusing to unpickle it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise RewriteError(f"{path / METADATA_FILE}: not a readable DCP metadata file ({e})") from None
    if not isinstance(meta, md.Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise RewriteError(f"{path / METADATA_FILE}: holds {type(meta).__name__}, not DCP Metadata")
    return meta


def _last_line(e: BaseException) -> str:
    """The failure itself: DCP's CheckpointException text ends with the rank's traceback."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> md.Metadata:
        meta = read_metadata(Path(self.path))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = md.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class _Window(io.RawIOBase):
    """A read-only file object over bytes [lo, lo + n) of a memory map (one chunk's torch.save)."""

    def __init__(self, mm: mmap.mmap, lo: int, n: int):
        super().__init__()
        self.mm, self.lo, self.n, self.pos = mm, lo, n, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, pos + (0, self.pos, self.n)[whence])
        return self.pos

    def readinto(self, out) -> int:
        k = max(0, min(len(out), self.n - self.pos))
        out[:k] = self.mm[self.lo + self.pos:self.lo + self.pos + k]
        self.pos += k
        return k


class _NotMappable(Exception):
    """A chunk whose bytes cannot be mapped in place (a transform, a compressed record)."""


def _map_chunk(mm: mmap.mmap, lo: int, n: int) -> torch.Tensor:
    """The tensor ``torch.save`` wrote at bytes [lo, lo + n) of ``mm``, backed by the map.

    Its geometry comes from ``torch.load(map_location="meta")`` (the pickle only, no storage
    bytes read); its bytes are the zip's one ``data/<key>`` record, stored uncompressed, which
    starts after the record's local header (30 bytes, the name, the extra field that torch uses
    to align the data)."""
    if lo < 0 or n <= 0 or lo + n > len(mm):
        raise ValueError("a chunk lies outside its file")
    geometry = torch.load(_Window(mm, lo, n), map_location="meta", weights_only=True)
    if not isinstance(geometry, torch.Tensor):
        raise ValueError(f"a chunk holds {type(geometry).__name__}, not a tensor")
    records = [r for r in zipfile.ZipFile(_Window(mm, lo, n)).infolist()
               if re.search(r"/data/\d+$", r.filename)]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        raise _NotMappable
    record = records[0]
    head = lo + record.header_offset
    name_len, extra_len = struct.unpack("<HH", mm[head + 26:head + 30])
    start, nbytes = head + 30 + name_len + extra_len, geometry.untyped_storage().nbytes()
    if nbytes != record.file_size or start + nbytes > lo + n:
        raise ValueError("a chunk's storage record does not match its tensor")
    if nbytes == 0:
        return torch.empty(geometry.shape, dtype=geometry.dtype)
    storage = torch.frombuffer(mm, dtype=torch.uint8, offset=start, count=nbytes).view(geometry.dtype)
    return storage.as_strided(geometry.shape, geometry.stride(), geometry.storage_offset())


class _Files:
    """The directory's data files, each mapped once (private: nothing is ever written back)."""

    def __init__(self, path: Path):
        self.path, self.maps = path, {}

    def map(self, name: str) -> mmap.mmap:
        if name not in self.maps:
            file = self.path / name
            if Path(name).name != name or not file.is_file():
                raise ValueError(f"names data file {name!r}, which is not a file in the directory")
            with open(file, "rb") as f:
                self.maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self.maps[name]


def _mapped_tensor(files: _Files, meta: md.Metadata, key: str, item: md.TensorStorageMetadata) -> torch.Tensor:
    """``key``'s full tensor: its one chunk mapped in place, or several chunks (row- or column-wise
    shards from several ranks) copied into one tensor, each chunk's pages released once copied."""
    size = tuple(item.size)
    parts = []
    for chunk in item.chunks:
        info = meta.storage_data[md.MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise _NotMappable
        t = _map_chunk(files.map(info.relative_path), int(info.offset), int(info.length))
        if tuple(t.shape) != tuple(chunk.sizes) or t.dtype != item.properties.dtype:
            raise ValueError(f"{key}: a chunk is {tuple(t.shape)} {t.dtype}, the metadata says "
                             f"{tuple(chunk.sizes)} {item.properties.dtype}")
        parts.append((tuple(chunk.offsets), t))
    if len(parts) == 1 and all(o == 0 for o in parts[0][0]) and parts[0][1].shape == size:
        return parts[0][1]
    out = torch.empty(size, dtype=item.properties.dtype)
    covered = 0
    for offsets, t in parts:
        if len(offsets) != len(size) or any(o < 0 or o + k > s for o, k, s in zip(offsets, t.shape, size)):
            raise ValueError(f"{key}: a chunk at {list(offsets)} of shape {tuple(t.shape)} lies outside "
                             f"the tensor's size {list(size)}")
        out[tuple(slice(o, o + k) for o, k in zip(offsets, t.shape))] = t
        covered += t.numel()
        release(t)
    if covered != out.numel():          # DCP's chunks never overlap, so counting suffices
        raise ValueError(f"{key}: its chunks cover {covered} of {out.numel()} elements")
    return out


def _dcp_load(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill ``state`` (pre-allocated tensors) with DCP's own reader (copies)."""
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_SafeReader(path))
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        text = _last_line(e)
        raise RewriteError(f"{path}: could not read the DCP checkpoint's data files ({text})") from None


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor in the checkpoint as a full dense tensor, in metadata order; and the keys of
    the non-tensor entries that were skipped.

    Tensors saved in one chunk (a whole table on one rank, every dense parameter) are backed by
    the data file's pages (``_map_chunk``): nothing is read until a tensor is used.  A tensor in
    several chunks is assembled into memory, one at a time; one whose chunks cannot be mapped (a
    storage transform) is read by DCP's own reader."""
    meta = read_metadata(path)
    state: dict[str, torch.Tensor] = {}
    skipped, fallback = [], {}
    files = _Files(path)
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(item, md.TensorStorageMetadata):
            skipped.append(key)
            continue
        try:
            state[key] = _mapped_tensor(files, meta, key, item)
        except _NotMappable:
            state[key] = fallback[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        except (ValueError, KeyError, TypeError, RuntimeError, EOFError, OSError, zipfile.BadZipFile,
                pickle.UnpicklingError, struct.error) as e:
            text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RewriteError(f"{path}: could not read the DCP checkpoint's data files ({key}: {text})") from None
    if not state:
        raise RewriteError(f"{path}: the DCP checkpoint holds no tensors")
    if fallback:
        _dcp_load(path, fallback)
    return state, skipped
