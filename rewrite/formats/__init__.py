"""Checkpoint readers and writers.  ``load`` tells the format from the file's content.

    dlrm-rewrite safetensors file   -> native
    torch.save file                 -> by its keys: facebookresearch/dlrm or TorchRec DLRM/DLRM_DCN
                                       (ShardedTensor values are reassembled, formats.sharded)
    directory with a .metadata      -> torch.distributed.checkpoint; by its keys, as above
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewrite.core.errors import RewriteError
from rewrite.core.mapped import expect_random
from rewrite.core import model_file as native
from rewrite.formats import dlrm, torchrec
from rewrite.formats.safe_pickle import load_pickled
from rewrite.core.model import RecModel

DLRM_OPTIONS = ("interaction", "qr_op", "qr_rows")
DCP_METADATA = ".metadata"        # formats.dcp.METADATA_FILE, here so telling the format imports no
                                  # torch.distributed (formats.dcp is imported only to read one)
TORCHREC_OPTIONS = ("features", "pooling", "table_order")


def is_dcp(path: Path) -> bool:
    """A torch.distributed.checkpoint directory (one with a ``.metadata`` file)."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def detect(path: Path) -> str:
    if not path.exists():
        raise RewriteError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_dcp(path):
            return "dcp"
        raise RewriteError(f"{path}: is a directory without a .metadata file, so not a "
                           f"torch.distributed.checkpoint directory")
    return "native" if native.is_native(path) else "pickle"


def load(path: str | Path, **overrides: Any) -> RecModel:
    """Load any supported checkpoint into the canonical RecModel, with no config file.

    overrides for dlrm files: ``interaction``, ``qr_op``, ``qr_rows`` (see ``formats.dlrm.read``);
    for TorchRec state dicts: ``features``, ``pooling``, ``table_order`` (``formats.torchrec.read``).
    An override that does not apply to the file's format is an error, not silently ignored.
    Tensors come back backed by the file's pages where the format allows (native safetensors,
    torch.save zips, single-chunk DCP tensors): nothing is read until a table is used.
    """
    model = _load(Path(path), {k: v for k, v in overrides.items() if v is not None})
    expect_random(*model.state_dict().values())     # tensors mapped from the file: read as lookups
    return model


def _load(path: Path, overrides: dict[str, Any]) -> RecModel:
    kind = detect(path)
    if kind == "native":
        _check_overrides(path, "native", overrides, ())
        return native.load(path)
    if kind == "dcp":
        from rewrite.formats import dcp

        state, skipped = dcp.load_state_dict(path)
        meta: dict[str, Any] = {"container": "torch.distributed.checkpoint"}
        if skipped:
            meta["skipped_non_tensor_keys"] = skipped[:20]
    else:
        obj = load_pickled(path)
        if not isinstance(obj, dict):
            raise RewriteError(f"{path}: expected a dict (a checkpoint or a state dict), "
                               f"found {type(obj).__name__}")
        state, meta = flatten(obj), {"container": "torch.save"}
    if torchrec.looks_like_torchrec(state):
        _check_overrides(path, "torchrec", overrides, TORCHREC_OPTIONS)
        opts = {"table_order": "natural" if kind == "dcp" else "state", **overrides}
        return torchrec.read(state, path, provenance=meta, **opts)
    src = obj if kind == "pickle" else state
    if dlrm.looks_like_dlrm(dlrm.state_dict_of(src, path)[0]):
        _check_overrides(path, "dlrm", overrides, DLRM_OPTIONS)
        return dlrm.read(src, path, **overrides)
    sample = ", ".join(list(state)[:4])
    raise RewriteError(f"{path}: not a recognised DLRM checkpoint (keys start: {sample or 'none'}); "
                       f"supported: facebookresearch/dlrm, TorchRec DLRM / DLRM_DCN (torch.save or "
                       f"torch.distributed.checkpoint), dlrm-rewrite safetensors")


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys, as DCP stores them ({"model": sd} -> "model.*")."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_overrides(path: Path, fmt: str, overrides: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(k for k, v in overrides.items() if v is not None and k not in allowed)
    if extra:
        raise RewriteError(f"{path}: option(s) {', '.join(extra)} do not apply to a {fmt} checkpoint"
                           + (f" (it takes {', '.join(allowed)})" if allowed else ""))


def source_format(model: RecModel) -> str:
    return model.spec.provenance.get("format", "unknown")
