"""An output model file written while the run that produces it goes on, so each table is written once.

Before: a run over a checkpoint larger than memory spilled each rewritten table to a scratch file
        (to keep it out of RSS), then ``save`` copied every table into the output: the result was
        written twice (4.3 GB for the 30 GiB DLRMv2 DCP at int4; this disk writes ~0.45 GB/s).
After:  ``ResultFile(target)`` opens a temporary sibling of ``target`` whose first
        ``HEADER_SPACE`` bytes are kept for the header.  ``place(t)`` appends t's bytes to the data
        region and returns t mapped back from there (``mapped.spill`` calls it for the tables it
        moves out of memory).  ``finish(model)`` then appends the tensors that were not placed,
        in safetensors' order, writes the header into the kept space (the JSON padded with spaces,
        which safetensors allows), fsyncs and renames the file onto ``target``.

The file is valid safetensors, not byte-identical to ``safetensors.torch.save_file`` (the data of
placed tensors comes in the order they were placed, the header is padded to ``HEADER_SPACE``).
``finish`` writes a fresh file with ``model_file.write_tensors`` instead (byte-identical to
``save_file``, the placed bytes copied) when nothing was placed, when the placed tensors of the
final model do not tile the region exactly (a table placed then rewritten again, or dropped: a
safetensors file may not hold bytes no tensor owns), when a tensor would start at an offset its
element size does not divide, or when the header outgrows its space.  ``discard`` (or leaving the
``with`` block without ``finish``) removes the temporary file; ``target`` is untouched.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from tqdm import tqdm

from rewrite.core import mapped
from rewrite.core.atomic import temp_beside
from rewrite.core.model import RecModel
from rewrite.core.model_file import (DTYPES, PROGRESS_MIN_BYTES, RANK, contents, header_text, write_tensor,
                                     write_tensors)

HEADER_SPACE = 1 << 20      # bytes before the data: the u64 length and the header, padded
WRITE_BYTES = 64 << 20      # bytes per write() call


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class ResultFile:
    """The temporary output (module docstring); a context manager that discards it unless finished."""

    def __init__(self, target: Path | str):
        self.target = Path(target)
        self.tmp = temp_beside(self.target)
        self.file = open(self.tmp, "r+b")
        self.file.truncate(HEADER_SPACE)
        self.end = HEADER_SPACE                       # where the next placed tensor starts
        self.placed: dict[int, tuple[int, int]] = {}  # data_ptr of a placed tensor -> (offset, bytes)

    def __enter__(self) -> "ResultFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def _append(self, raw: torch.Tensor) -> None:
        self.file.seek(self.end)
        data = raw.numpy()
        for lo in range(0, len(data), WRITE_BYTES):
            self.file.write(memoryview(data[lo:lo + WRITE_BYTES]))
        self.end += len(data)

    def place(self, t: torch.Tensor) -> torch.Tensor | None:
        """``t``'s values, now backed by this file's pages (a private map: clean, droppable pages);
        None when the next offset is not a multiple of t's element size (keep it elsewhere) or t
        is placed already."""
        if self.file.closed or t.data_ptr() in self.placed or (self.end - HEADER_SPACE) % t.element_size():
            return None
        start, raw = self.end, _raw(t)
        self._append(raw)
        self.file.flush()
        out = mapped.map_back(self.file, start, t)
        self.placed[out.data_ptr()] = (start, raw.numel())
        return out

    def _layout(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, int], list[str], int] | None:
        """(offset from the data's start of every tensor, the tensors to append in order, where
        the placed ones end): the placed tensors where they are, the others after them; None
        where that is not a valid file."""
        where, rest = {}, []
        for name, t in tensors.items():
            spot = self.placed.get(t.data_ptr()) if t.is_contiguous() else None
            if spot is not None and spot[1] == t.numel() * t.element_size():
                where[name] = spot
            else:
                rest.append(name)
        spans = sorted(where.values())
        if not spans or spans[0][0] != HEADER_SPACE or len(set(spans)) != len(spans) \
                or any(a[0] + a[1] != b[0] for a, b in zip(spans, spans[1:])):
            return None
        placed_end = end = spans[-1][0] + spans[-1][1]
        offsets = {name: off - HEADER_SPACE for name, (off, _) in where.items()}
        rest.sort(key=lambda k: (RANK[tensors[k].dtype], k))
        for name in rest:
            t = tensors[name]
            if (end - HEADER_SPACE) % t.element_size():
                return None
            offsets[name] = end - HEADER_SPACE
            end += t.numel() * t.element_size()
        return offsets, rest, placed_end

    @staticmethod
    def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str], offsets: dict[str, int]) -> bytes | None:
        """The u64 length and the JSON header padded to ``HEADER_SPACE``; None when it does not fit."""
        text, room = header_text(tensors, metadata, offsets), HEADER_SPACE - 8
        return struct.pack("<Q", room) + text + b" " * (room - len(text)) if len(text) <= room else None

    def finish(self, model: RecModel) -> None:
        """Write ``model`` to ``target`` (module docstring) and close this file."""
        tensors, metadata = contents(model)
        known = all(t.dtype in DTYPES for t in tensors.values())
        layout = self._layout(tensors) if self.placed and known else None
        head = layout and self._header(tensors, metadata, layout[0])
        if not head:                 # the general writer, from scratch (it reads placed tensors here)
            write_tensors(tensors, metadata, self.target)
            self.discard()
            return
        _, rest, self.end = layout
        self.file.truncate(self.end)     # bytes of a placed tensor the model no longer holds, at the end
        self.file.seek(self.end)
        total = sum(tensors[k].numel() * tensors[k].element_size() for k in rest)
        with tqdm(total=total, desc=f"writing {self.target.name}", unit="B", unit_scale=True, leave=False,
                  mininterval=1.0, disable=total < PROGRESS_MIN_BYTES) as bar:
            pages = mapped.FilePages(*(tensors[k] for k in rest))   # a table left as it was: mapped
            for name in rest:
                write_tensor(self.file, tensors[name], bar, pages)
        self.file.seek(0)
        self.file.write(head)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        """Close and remove the temporary file, if it is still there."""
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)
