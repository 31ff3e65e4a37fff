"""``torch.load`` that never runs pickled code.

dlrm's ``--save-model`` pickles numpy scalars (``test_acc`` etc.); PyTorch's weights-only unpickler
refuses them unless allowed.  We allow exactly numpy's scalar reconstructor and dtype classes,
under both the numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) module spellings, plus the
ShardedTensor family's names mapped to inert stand-ins (``formats.sharded``), and nothing
else: a pickle that names any other global is rejected with the name of that global.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from rewrite.core.errors import RewriteError
from rewrite.formats import sharded


def _numpy_allowlist() -> list[Any]:
    scalar = np._core.multiarray.scalar
    allowed: list[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if name.endswith("DType") and isinstance(cls, type):
            allowed.append(cls)
    return allowed


@contextlib.contextmanager
def _quiet_foreign_pickles() -> Iterator[None]:
    """A plain pickle (protocol > 2) makes torch warn before it fails; our one-line error says it all."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def load_pickled(path: Path) -> Any:
    """Load a ``torch.save`` file with ``weights_only=True`` and the numpy allow-list;
    ShardedTensor values come back as dense tensors (``formats.sharded``)."""
    try:
        with torch.serialization.safe_globals(_numpy_allowlist() + sharded.standins()), \
                _quiet_foreign_pickles():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_zipfile(path))
    except FileNotFoundError:
        raise RewriteError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RewriteError(f"{path}: is a directory, not a checkpoint file") from None
    except RewriteError as e:
        raise RewriteError(f"{path}: {e}") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise RewriteError(f"{path}: not a loadable checkpoint: {_reason(path, e)}") from None
    return sharded.resolve(obj, path)


def _zipfile(path: Path) -> bool:
    """mmap works only for the zip format torch.save writes since 1.6."""
    return _starts_with(path, b"PK\x03\x04")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _reason(path: Path, e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "GLOBAL" in line:
            name = line.split("GLOBAL")[-1].strip(" :.")
            return f"it names code to run ({name}); refusing to unpickle it"
    if "DTensor" in text:
        return f"it holds DTensor values, which need a process group to unpickle; {sharded.WAY_OUT}"
    if "central directory" in text or isinstance(e, EOFError):
        return "the file is truncated or corrupted"
    # a zip whose records run past its end fails to mmap; a legacy file runs out of storage bytes
    if (isinstance(e, OSError) and _zipfile(path)) or "unexpected EOF" in text:
        return "the file is truncated or corrupted"
    if "Unsupported operand" in text and _starts_with(path, b"\x80"):   # pickle PROTO opcode
        return "a plain pickle using opcodes the safe (weights-only) loader refuses; not a torch.save checkpoint"
    if not _zipfile(path):
        return "not a torch.save file (neither a zip archive nor a pickle)"
    return (text.splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
