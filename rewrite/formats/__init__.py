"""Checkpoint readers and writers.  ``load`` tells the format from the file's content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewrite.errors import RewriteError
from rewrite.formats import dlrm, native
from rewrite.formats.safe_pickle import load_pickled
from rewrite.model import RecModel


def detect(path: Path) -> str:
    if not path.exists():
        raise RewriteError(f"{path}: no such file or directory")
    if path.is_dir():
        raise RewriteError(f"{path}: is a directory, not a checkpoint file")
    return "native" if native.is_native(path) else "pickle"


def load(path: str | Path, **overrides: Any) -> RecModel:
    """Load any supported checkpoint into the canonical RecModel, with no config file.

    overrides (dlrm files): ``interaction``, ``qr_op``, ``qr_rows`` (see ``formats.dlrm.read``).
    """
    path = Path(path)
    kind = detect(path)
    if kind == "native":
        return native.load(path)
    obj = load_pickled(path)
    state, _ = dlrm.state_dict_of(obj, path)
    if dlrm.looks_like_dlrm(state):
        return dlrm.read(obj, path, **overrides)
    sample = ", ".join(list(state)[:4])
    raise RewriteError(f"{path}: not a recognised DLRM checkpoint (keys start: {sample or 'none'}); "
                       f"supported: facebookresearch/dlrm, dlrm-rewrite safetensors")


def source_format(model: RecModel) -> str:
    return model.spec.provenance.get("format", "unknown")
