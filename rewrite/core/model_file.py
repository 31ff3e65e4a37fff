"""The toolkit's own format: one safetensors file, the versioned JSON spec in its metadata.

Metadata key ``dlrm_rewrite.spec`` holds ``RecModel.full_spec()``; tensors are the model's
state dict.  safetensors stores raw bytes with their dtype, so save -> load is bit-exact.

Streaming, for checkpoints larger than memory:

* ``save`` writes the safetensors layout itself, tensor by tensor: the header (u64 length, then
  JSON: ``__metadata__``, then each tensor's dtype, shape and ``data_offsets``, in safetensors'
  order: dtype by descending rank, then name; padded with spaces to a multiple of 8) is computed
  from shapes and dtypes up front, then each tensor's bytes follow in that order, in blocks of
  ``mapped.BLOCK_BYTES``, each block's source pages released (``mapped.release``) once written.
  The file is byte-identical to ``safetensors.torch.save_file`` of the same state dict (tested).
* ``load`` maps the file (safetensors' ``safe_open``: tensors backed by the file's pages, nothing
  read until touched) and builds the model table by table, each table's tensors assigned right
  after its module is made, so at most one table's freshly built placeholder exists at a time.
* ``read_spec`` reads the header only: what ``rewrite inspect`` needs.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import safetensors
import torch
from tqdm import tqdm

from rewrite.core import mapped
from rewrite.core.atomic import atomic_path
from rewrite.core.errors import RewriteError
from rewrite.core.model import SPEC_VERSION, ModelSpec, RecModel
from rewrite.core.embedding import representation_class

META_KEY = "dlrm_rewrite.spec"
MAGIC_OFFSET = 8  # safetensors: u64 header length, then a JSON header starting with '{'
# safetensors' dtype names, in the order its writer sorts tensors (descending Dtype rank; checked
# against safetensors.torch.save_file by tests/rewrite/core/test_model_file.py)
DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
          torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
          torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
          torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
RANK = {dtype: k for k, dtype in enumerate(DTYPES)}   # safetensors' order of dtypes
PROGRESS_MIN_BYTES = 256 << 20   # writes at least this large show a progress bar on stderr


def is_native(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(MAGIC_OFFSET + 1)
    except OSError:
        return False
    return len(head) == MAGIC_OFFSET + 1 and head[MAGIC_OFFSET:] == b"{"


def header_text(tensors: dict[str, torch.Tensor], metadata: dict[str, str], offsets: dict[str, int]) -> bytes:
    """safetensors' JSON header (unpadded): ``__metadata__`` when there is any, then each tensor's
    dtype, shape and ``data_offsets`` (from ``offsets``: its start in the data), by offset."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for k in sorted(offsets, key=offsets.get):
        t = tensors[k]
        entries[k] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offsets[k], offsets[k] + t.numel() * t.element_size()]}
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """safetensors' header for ``tensors`` (its first 8 bytes included) and the order their
    bytes follow it."""
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in DTYPES})
    if unknown:
        raise RewriteError(f"cannot store dtype(s) {', '.join(unknown)} in safetensors")
    order = sorted(tensors, key=lambda k: (RANK[tensors[k].dtype], k))
    offsets, offset = {}, 0
    for k in order:
        offsets[k] = offset
        offset += tensors[k].numel() * tensors[k].element_size()
    text = header_text(tensors, metadata, offsets)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_tensor(f, t: torch.Tensor, bar: tqdm, pages: mapped.FilePages) -> None:
    """t's bytes, a large tensor in row blocks, releasing the file-backed source pages once written
    (``pages``: those of every tensor written, found once, not per tensor)."""
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    raw = flat.view(torch.uint8)
    if raw.numel() <= mapped.BLOCK_BYTES:
        f.write(memoryview(raw.numpy()))
        pages.advise(mmap.MADV_DONTNEED, within=t)
        bar.update(raw.numel())
        return
    for lo, hi, block in mapped.indexed_blocks(raw):
        f.write(memoryview(block.numpy()))
        bar.update(hi - lo)


def contents(model: RecModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a saved ``model`` holds: its state dict and the metadata with its spec."""
    return ({k: v.detach() for k, v in model.state_dict().items()},
            {META_KEY: json.dumps(model.full_spec(), sort_keys=True)})


def save(model: RecModel, path: Path | str) -> None:
    """Write ``model`` atomically, tensor by tensor (module docstring): the bytes of
    ``safetensors.torch.save_file(model.state_dict(), path, metadata=spec)``."""
    write_tensors(*contents(model), path)


def write_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path | str) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``'s bytes, written atomically one
    tensor (block) at a time, with no copy of the whole."""
    head, order = header(tensors, metadata)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tqdm(total=total, desc=f"writing {Path(path).name}", unit="B", unit_scale=True, leave=False,
                 mininterval=1.0, disable=total < PROGRESS_MIN_BYTES) as bar:
        f.write(head)
        pages = mapped.FilePages(*tensors.values())
        for k in order:
            write_tensor(f, tensors[k], bar, pages)


def read_spec(path: Path) -> dict[str, Any]:
    """The checked spec from the file's header (no tensor bytes read)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise RewriteError(f"{path}: not a readable safetensors file: {str(e).splitlines()[0]}") from None
    return _spec(path, meta)


def _spec(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    if META_KEY not in meta:
        raise RewriteError(f"{path}: safetensors file without a dlrm-rewrite spec "
                           f"(metadata key {META_KEY!r}); it was not written by this toolkit")
    try:
        spec = json.loads(meta[META_KEY])
        version = spec["version"]
    except (ValueError, KeyError, TypeError):
        raise RewriteError(f"{path}: the spec in its metadata is not valid JSON with a version") from None
    if not isinstance(version, int):
        raise RewriteError(f"{path}: spec version must be an integer, got {version!r}")
    if version > SPEC_VERSION:
        raise RewriteError(f"{path}: spec version {version} is newer than this toolkit's "
                           f"({SPEC_VERSION}); upgrade dlrm-rewrite")
    return spec


def _fill(path: Path, module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Assign ``tensors[prefix + k]`` to every state entry k of ``module``, checked."""
    expected = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(prefix + k for k in set(expected) - set(given))
    if missing:
        raise RewriteError(f"{path}: tensors do not match the spec (missing {missing[:3]})")
    for k, v in expected.items():
        t = given[k]
        if v.shape != t.shape or v.dtype != t.dtype:
            raise RewriteError(f"{path}: tensor {prefix}{k} is {tuple(t.shape)} {t.dtype}, "
                               f"the spec says {tuple(v.shape)} {v.dtype}")
    module.load_state_dict({k: given[k] for k in expected}, assign=True)


def _build(path: Path, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RecModel:
    """``rewrite.core.model.model_from_spec`` with each table filled from ``tensors`` as soon as it is made."""
    model_spec = ModelSpec.from_json(spec["model"])
    tables = {}
    for t in spec["tables"]:
        params = {k: v for k, v in t.items() if k not in ("name", "kind")}
        rep = representation_class(t["kind"]).from_params(**params)
        _fill(path, rep, f"embeddings.{t['name']}.", tensors)
        tables[t["name"]] = rep
    model = RecModel(model_spec, tables)
    known = set(model.state_dict())
    extra = sorted(set(tensors) - known)
    if extra:
        raise RewriteError(f"{path}: tensors do not match the spec (unexpected {extra[:3]})")
    for name in ("bottom", "interaction", "top"):
        _fill(path, getattr(model, name), f"{name}.", tensors)
    return model


def load(path: Path) -> RecModel:
    """The model in ``path``, its tensors backed by the file's pages (read when touched)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RewriteError(f"{path}: not a readable safetensors file: {str(e).splitlines()[0]}") from None
    spec = _spec(path, meta)
    try:
        model = _build(path, spec, tensors)
    except RewriteError as e:
        raise e if str(e).startswith(f"{path}:") else RewriteError(f"{path}: {e}") from None
    except Exception as e:  # any bad field: KeyError, TypeError, ValueError, RuntimeError, ...
        raise RewriteError(f"{path}: malformed spec: {type(e).__name__}: {e}") from None
    return model.eval()
