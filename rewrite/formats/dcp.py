"""``torch.distributed.checkpoint`` (DCP) directories -> one state dict of dense tensors.

A DCP directory holds ``.metadata`` (a pickle of ``Metadata``: every key's global size, dtype
and chunks) and one ``__{rank}_{i}.distcp`` file per writer with the chunks.  Sharded tables
(row-, column- or table-wise, from any number of ranks) are reassembled by DCP's own planner
into full tensors: we pre-allocate ``torch.empty(size, dtype)`` for every tensor key and let
``dcp.load`` fill it, in this process, with no process group.

Nothing from the directory runs: ``.metadata`` is read with a restricted unpickler that
resolves only DCP's metadata dataclasses, ``torch.Size`` and torch dtype/layout/memory-format
constants, the last by name (any other global is refused by name); tensor chunks are read by DCP's
``FileSystemReader`` with ``torch.load(weights_only=True)``; non-tensor entries (step counters,
strings), which DCP stores as arbitrary pickles, are not read at all.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as md

from rewrite.core.errors import RewriteError

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


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor in the checkpoint as a full dense tensor, in metadata order; and the keys of
    the non-tensor entries that were skipped."""
    meta = read_metadata(path)
    state: dict[str, torch.Tensor] = {}
    skipped = []
    for key, item in meta.state_dict_metadata.items():
        if isinstance(item, md.TensorStorageMetadata):
            state[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        else:
            skipped.append(key)
    if not state:
        raise RewriteError(f"{path}: the DCP checkpoint holds no tensors")
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_SafeReader(path))
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        text = _last_line(e)
        raise RewriteError(f"{path}: could not read the DCP checkpoint's data files ({text})") from None
    return state, skipped
