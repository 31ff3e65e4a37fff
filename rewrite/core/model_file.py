"""The toolkit's own format: one safetensors file, the versioned JSON spec in its metadata.

Metadata key ``dlrm_rewrite.spec`` holds ``RecModel.full_spec()``; tensors are the model's
state dict.  safetensors stores raw bytes with their dtype, so save -> load is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch

from rewrite.core.atomic import atomic_path
from rewrite.core.errors import RewriteError
from rewrite.core.model import SPEC_VERSION, RecModel, model_from_spec

META_KEY = "dlrm_rewrite.spec"
MAGIC_OFFSET = 8  # safetensors: u64 header length, then a JSON header starting with '{'


def is_native(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(MAGIC_OFFSET + 1)
    except OSError:
        return False
    return len(head) == MAGIC_OFFSET + 1 and head[MAGIC_OFFSET:] == b"{"


def save(model: RecModel, path: Path | str) -> None:
    """Write ``model`` atomically (contiguous copies only where a tensor is a view)."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {META_KEY: json.dumps(model.full_spec(), sort_keys=True)}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)


def load(path: Path) -> RecModel:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RewriteError(f"{path}: not a readable safetensors file: {str(e).splitlines()[0]}") from None
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
    try:
        model = model_from_spec(spec)
    except RewriteError as e:
        raise RewriteError(f"{path}: {e}") from None
    except Exception as e:  # any bad field: KeyError, TypeError, ValueError, RuntimeError, ...
        raise RewriteError(f"{path}: malformed spec: {type(e).__name__}: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise RewriteError(f"{path}: tensors do not match the spec (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    for k, v in expected.items():
        if v.shape != tensors[k].shape or v.dtype != tensors[k].dtype:
            raise RewriteError(f"{path}: tensor {k} is {tuple(tensors[k].shape)} {tensors[k].dtype}, "
                               f"the spec says {tuple(v.shape)} {v.dtype}")
    model.load_state_dict(tensors, assign=True)
    return model.eval()
