"""ONNX tables in 2 MiB huge pages for onnxruntime (used by ``targets.onnx.cpu.onnx_session``).

Initializers held in external data (models above 2 GB: the tables) of at least
``HUGE_PAGE_MIN_BYTES`` are read from the data file into one anonymous memory map
advised ``MADV_HUGEPAGE`` and handed to onnxruntime with ``SessionOptions.add_initializer``,
which uses the buffer in place (no copy; it must outlive the session).  Otherwise onnxruntime
memory-maps the data file on 4 KiB pages, and on this VM's nested paging a random row read then
costs a TLB miss: 26 tables of the Kaggle shape, B = 2048, one id per bag, the embedding stage
2.86 -> 2.47 ms (eager 2.87).  ``SessionOptions.add_external_initializers`` does not do this:
it copies every tensor into onnxruntime's own allocation (+2 GB, 29 s to create the session,
no huge pages).  Costs: the tables are private memory of the process (not the shared page
cache) and loading reads the whole data file (2.16 GB: 2.0 s from the page cache, 15 s cold).

The graph is read from the model file's protobuf wire bytes (``external_initializers``): a
serving process imports no ``onnx``; the tensors are read as raw bytes, nothing is unpickled.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from rewrite.core.errors import RewriteError

HUGE_PAGE = 2 * 1024**2
HUGE_PAGE_MIN_BYTES = HUGE_PAGE      # smaller external initializers stay with onnxruntime
GRAPH_ONLY_BYTES = 64 * 1024**2      # a model file larger than this holds its tensors inline
ALIGN = 64                           # bytes: start of every tensor in the huge-page buffer


# ONNX TensorProto element types a huge-page initializer may have (numpy has no bfloat16: those
# stay with onnxruntime): FLOAT, UINT8, INT8, INT32, INT64, FLOAT16, DOUBLE
NUMPY_DTYPES = {1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8),
                6: np.dtype(np.int32), 7: np.dtype(np.int64), 10: np.dtype(np.float16),
                11: np.dtype(np.float64)}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The protobuf varint at ``buf[pos]``, and the position after it."""
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, value) of a protobuf message's wire bytes: an int for varints, the
    (start, end) span for length-delimited fields; 64/32-bit fields are skipped."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield field, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
    if pos != end:
        raise ValueError("protobuf field runs past its message")


def external_initializers(model: bytes) -> list[tuple[str, int, tuple[int, ...], dict[str, str]]]:
    """(name, element type, dims, external-data entries) of every initializer of the main graph
    stored as external data, read from the ModelProto's wire bytes (ModelProto.graph = 7,
    GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, name = 8,
    external_data = 13 as key 1 / value 2, data_location = 14, EXTERNAL = 1): the runtime side
    reads this without the ``onnx`` package."""
    out = []
    for field, graph in _fields(model):
        if field != 7:
            continue
        for gfield, tensor in _fields(model, *graph):
            if gfield != 5:
                continue
            name, dtype, dims, entries, external = "", 0, [], {}, False
            for tfield, value in _fields(model, *tensor):
                if tfield == 1 and isinstance(value, int):
                    dims.append(value)
                elif tfield == 1:                            # packed dims
                    pos, stop = value
                    while pos < stop:
                        dim, pos = _varint(model, pos)
                        dims.append(dim)
                elif tfield == 2:
                    dtype = value
                elif tfield == 8:
                    name = model[value[0]:value[1]].decode()
                elif tfield == 13:
                    kv = {k: model[a:b].decode() for k, (a, b) in _fields(model, *value) if k in (1, 2)}
                    entries[kv.get(1, "")] = kv.get(2, "")
                elif tfield == 14:
                    external = value == 1
            if external:
                out.append((name, dtype, tuple(dims), entries))
    return out


def huge_page_initializers(path: Path) -> tuple[dict[str, np.ndarray], mmap.mmap | None]:
    """The external-data initializers of ``path`` of at least ``HUGE_PAGE_MIN_BYTES`` (numpy
    dtypes only), each read from its data file into one anonymous ``mmap`` advised
    ``MADV_HUGEPAGE`` (the first tensor at a 2 MiB boundary, each at a 64-byte one): {name:
    array over the map}, and the map, which must outlive every session using the arrays.

    ({}, None) when the model has no such initializer, the platform has no ``MADV_HUGEPAGE``,
    or ``path`` is not a graph-only ONNX file (onnxruntime reports what is wrong with it).
    A data file that is missing, outside the model's folder, or too short for a tensor's
    offset, length and shape raises RewriteError.  The graph is read from its protobuf wire
    bytes (``external_initializers``), the tensors as raw bytes.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE") or path.stat().st_size > GRAPH_ONLY_BYTES:
        return {}, None
    try:
        initializers = external_initializers(path.read_bytes())
    except (IndexError, ValueError, UnicodeDecodeError):         # not a model: onnxruntime says so
        return {}, None
    tensors = []
    for name, element_type, shape, info in initializers:
        if element_type not in NUMPY_DTYPES:
            continue
        dtype = NUMPY_DTYPES[element_type]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes >= HUGE_PAGE_MIN_BYTES:
            tensors.append((name, dtype, shape, nbytes, _external_span(path, name, info, nbytes)))
    if not tensors:
        return {}, None
    starts, total = [], 0
    for *_, nbytes, _ in tensors:
        starts.append(total)
        total += -(-nbytes // ALIGN) * ALIGN
    buffer = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)        # before the first touch: faults then map 2 MiB pages
    raw = np.frombuffer(buffer, np.uint8)
    base = (-raw.ctypes.data) % HUGE_PAGE
    arrays = {}
    for (name, dtype, shape, nbytes, (file, offset)), start in zip(tensors, starts):
        dst = raw[base + start:base + start + nbytes]
        _read_into(file, offset, memoryview(dst))
        arrays[name] = dst.view(dtype).reshape(shape)
    return arrays, buffer


def _external_span(model_path: Path, name: str, info: dict[str, str], nbytes: int) -> tuple[Path, int]:
    """(data file, byte offset) of one external initializer, checked against the file."""
    location = info.get("location", "")
    folder = model_path.resolve().parent
    file = (folder / location).resolve()
    if not location or os.path.isabs(location) or folder not in file.parents:
        raise RewriteError(f"{model_path}: initializer {name} names external data {location!r} "
                           f"outside the model's folder")
    if not file.is_file():
        raise RewriteError(f"{model_path}: external data file {location} of initializer {name} is missing")
    offset, length = int(info.get("offset", 0)), int(info.get("length", nbytes))
    if length != nbytes:
        raise RewriteError(f"{model_path}: initializer {name} has {length} bytes of external data, "
                           f"its shape needs {nbytes}")
    if offset + nbytes > file.stat().st_size:
        raise RewriteError(f"{model_path}: external data file {location} is truncated: initializer "
                           f"{name} needs bytes {offset}..{offset + nbytes}, the file has "
                           f"{file.stat().st_size}")
    return file, offset


def _read_into(file: Path, offset: int, dst: memoryview) -> None:
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(dst):
            n = f.readinto(dst[done:])
            if not n:
                raise RewriteError(f"{file}: ended while reading (was it truncated meanwhile?)")
            done += n
