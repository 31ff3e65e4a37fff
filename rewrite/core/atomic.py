"""Atomic outputs: write into a temporary sibling, then ``os.replace`` it into place.

An interrupted run leaves at most a ``.tmp-*`` sibling, never a half-written artifact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rewrite.core.errors import RewriteError


def check_new_output(path: Path | str | None, force: bool, option: str = "-o") -> None:
    """The rule of every command that writes a file or folder the user named: an existing one is
    replaced only with ``--force`` (RewriteError, exit 2, before any work, otherwise)."""
    if path is not None and Path(path).exists() and not force:
        raise RewriteError(f"{option} {path}: already exists (use --force to replace it)")


def temp_beside(target: Path, directory: bool = False) -> Path:
    """A new empty ``.tmp-*`` file (or folder) beside ``target``, its parents made."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        fd, name = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
        os.close(fd)
        return Path(name)
    except OSError as e:   # a parent that is a file, no permission, read-only file system
        raise RewriteError(f"{target}: cannot write here ({e.strerror}: {e.filename})") from None


@contextlib.contextmanager
def atomic_path(target: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it onto ``target``."""
    target = Path(target)
    tmp = temp_beside(target, directory)
    try:
        yield tmp
        if directory:
            if target.exists():
                shutil.rmtree(target)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
