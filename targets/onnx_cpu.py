"""ONNX Runtime targets: the whole model as one ONNX graph run by onnxruntime.

Before: a RecModel (any representations built from gather / matmul / elementwise / segment-sum).
After:  ``model.onnx`` (opset 18; weights in ``model.onnx.data`` above 2 GB), inputs
``dense [B, n_dense]``, ``indices_f [n_f]``, ``offsets_f [B + 1]`` per feature, output
``logits [B]``; no ``Loop``: tables pool through the ``rewrite.bag_ops`` ops, which
``targets.onnx_bags`` translates (Gather, then an If: the rows themselves when every bag holds
one id, else ScatterND(add) over CumSum bag ids; docs/lowering.md).

Exporter: ``torch.onnx.export(dynamo=True)`` of the ``torch.export`` program (``export_program``
inside ``bag_ops.lowering()``, with ``onnx_bags.TRANSLATIONS`` as custom translations).
Both exporters gave a correct, Loop-free graph for the scatter-add segment sum; the dynamo one is the
maintained one, states offsets = batch + 1 symbolically, and its onnxscript optimizer folds
constants: on a 4-table composite model (table, QR, MD, fp16) its graph ran 0.053 ms at B=1
and 2.74 ms at B=2048 vs 0.097 / 3.05 ms for the legacy TorchScript exporter's graph (1 thread,
ORT 1.31, 20 fresh batches, 5 alternating rounds, medians; a one-off script, 2026-11).  Cost:
export takes ~3 s instead of ~0.4 s.

The dot interaction is exported in the form of ``targets.onnx_interaction`` (one GatherElements
with int32 indices instead of an element-by-element Gather).

Loading (``onnx_session``): initializers held in external data (models above 2 GB: the tables)
of at least ``HUGE_PAGE_MIN_BYTES`` are read from the data file into one anonymous memory map
advised ``MADV_HUGEPAGE`` and handed to onnxruntime with ``SessionOptions.add_initializer``,
which uses the buffer in place (no copy; it must outlive the session).  Otherwise onnxruntime
memory-maps the data file on 4 KiB pages, and on this VM's nested paging a random row read then
costs a TLB miss: 26 tables of the Kaggle shape, B = 2048, one id per bag, the embedding stage
2.86 -> 2.47 ms (eager 2.87).  ``SessionOptions.add_external_initializers`` does not do this:
it copies every tensor into onnxruntime's own allocation (+2 GB, 29 s to create the session,
no huge pages).  Costs: the tables are private memory of the process (not the shared page
cache) and loading reads the whole data file (2.16 GB: 2.0 s from the page cache, 15 s cold).

``onnx-cpu-int8``: the MLPs' Gemm nodes become MatMul + Add (onnxruntime's ``quantize_dynamic``
quantizes MatMul, not Gemm), then only those MatMuls are quantized:
    y = x W + b  ->  DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q) * (s_x s_W) + b
with per-output-channel int8 weights; tables' Gathers and the interaction stay fp32.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import tempfile
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from rewrite import bag_ops
from rewrite.batch import Batch
from rewrite.errors import RewriteError
from rewrite.model import RecModel
from targets.base import CompiledPath, Runner, Target, bag_input_names, export_program, register_target
from targets.onnx_interaction import int32_pair_indices, onnx_form

OPSET = 18
MODEL_FILE = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3          # bytes: a protobuf message cannot exceed 2 GiB
MLP_PREFIXES = ("model.bottom.", "model.top.")   # initializer names of the MLP weights
QUANTIZED_OPS = ("DynamicQuantizeLinear", "MatMulInteger")
HUGE_PAGE = 2 * 1024**2
HUGE_PAGE_MIN_BYTES = HUGE_PAGE      # smaller external initializers stay with onnxruntime
GRAPH_ONLY_BYTES = 64 * 1024**2      # a model file larger than this holds its tensors inline
ALIGN = 64                           # bytes: start of every tensor in the huge-page buffer


def export_onnx(model: RecModel, example: Batch):
    """ONNXProgram of ``ExportedBags(model)``: dynamic batch and lookup counts, opset 18; the dot
    interaction in ``targets.onnx_interaction``'s form, its pair indices int32."""
    import torch

    from targets.onnx_bags import TRANSLATIONS

    with bag_ops.lowering():
        program = export_program(onnx_form(model), example)
    names = bag_input_names(len(model.spec.features))
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, args=(), input_names=names,
                                         output_names=["logits"], opset_version=OPSET, dynamo=True,
                                         custom_translation_table=TRANSLATIONS)
    int32_pair_indices(onnx_program.model)
    ops = {n.op_type for n in onnx_program.model.graph.all_nodes()}
    if "Loop" in ops:
        raise RewriteError("onnx export produced a Loop op (an nn.EmbeddingBag or a Python loop "
                           "over bags in a representation); use rewrite.embedding.segment_sum")
    return onnx_program


def save_onnx(onnx_program, path: Path, external_threshold: int) -> None:
    size = sum(v.const_value.nbytes for v in onnx_program.model.graph.initializers.values()
               if v.const_value is not None)
    onnx_program.save(str(path), external_data=size > external_threshold)


def gemm_to_matmul(ir_model, prefixes: tuple[str, ...] = MLP_PREFIXES) -> list[str]:
    """Rewrite Gemm(x, W, b, transB=1) whose W is an MLP weight into MatMul(x, Wᵀ) + Add(b).

    Returns the names of the new MatMul nodes (the ones to quantize).
    """
    import onnx_ir as ir

    graph = ir_model.graph
    names = []
    for node in list(graph):
        if node.op_type != "Gemm":
            continue
        x, w, b = node.inputs
        attrs = {k: a.value for k, a in node.attributes.items()}
        if (w is None or w.const_value is None or not w.name.startswith(prefixes)
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = w.const_value.numpy()
        wt = ir.Value(name=f"{w.name}.T",
                      const_value=ir.tensor(np.ascontiguousarray(weight.T if attrs.get("transB", 0) else weight),
                                            name=f"{w.name}.T"))
        graph.register_initializer(wt)
        matmul = ir.node("MatMul", [x, wt], name=f"{node.name}_matmul")
        add = ir.node("Add", [matmul.outputs[0], b], name=f"{node.name}_bias")
        # named here: left unnamed, the serializer numbers them val_N and can repeat a name
        # the exporter gave elsewhere (a bag op's int64 value then typed an MLP activation)
        matmul.outputs[0].name, add.outputs[0].name = f"{node.name}_matmul_out", f"{node.name}_out"
        graph.insert_before(node, [matmul, add])
        node.outputs[0].replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        names.append(matmul.name)
    return names


def session_options(threads: int | None):
    """CPU session: all graph optimisations, sequential execution, ``threads`` intra-op threads
    (None: onnxruntime's default, one per physical core), no inter-op pool, no thread spinning
    (spinning burns the shared cores between requests)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


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


def _external_initializers(model: bytes) -> list[tuple[str, int, tuple[int, ...], dict[str, str]]]:
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
    bytes (``_external_initializers``: a serving process imports no ``onnx``), the tensors as
    raw bytes; nothing is unpickled.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE") or path.stat().st_size > GRAPH_ONLY_BYTES:
        return {}, None
    try:
        initializers = _external_initializers(path.read_bytes())
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


def onnx_session(path: Path, threads: int | None, providers: list[str]):
    """onnxruntime session of ``path`` with ``session_options(threads)``; on the CPU provider
    alone, the large external initializers in huge pages (``huge_page_initializers``), kept
    alive as the session's ``huge_pages`` attribute ({name: array}, and the map).  A file
    onnxruntime cannot load raises RewriteError."""
    import onnxruntime as ort

    so = session_options(threads)
    arrays, buffer = huge_page_initializers(path) if providers == ["CPUExecutionProvider"] else ({}, None)
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    for name, value in values.items():
        so.add_initializer(name, value)
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise RewriteError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
    session.huge_pages = (values, arrays, buffer)
    return session


def onnx_runner(path: Path, threads: int | None, providers: list[str]) -> Runner:
    session = onnx_session(path, threads, providers)
    names = [i.name for i in session.get_inputs()]

    def run(dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
        return session.run(None, dict(zip(names, [dense, *bags])))[0]

    run.session = session  # type: ignore[attr-defined]  (tests and `rewrite targets` inspect it)
    return run


@register_target("onnx-cpu")
class OnnxCpu(Target):
    summary = "whole model in ONNX (opset 18, dynamic shapes, no Loop) on onnxruntime's CPU provider"
    providers = ["CPUExecutionProvider"]

    def unavailable(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return (f"onnxruntime {ort.__version__} has no {missing[0]} "
                    f"(available: {', '.join(ort.get_available_providers())})")
        return None

    def lower(self, model: RecModel, example: Batch, out_dir: Path,
              external_threshold: int = PROTOBUF_LIMIT, **options: Any) -> CompiledPath:
        onnx_program = export_onnx(model, example)
        save_onnx(onnx_program, out_dir / MODEL_FILE, external_threshold)
        return CompiledPath(self.name, _files(out_dir), {"opset": OPSET})

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        return onnx_runner(out_dir / MODEL_FILE, threads, self.providers)


@register_target("onnx-cpu-int8")
class OnnxCpuInt8(OnnxCpu):
    summary = "onnx-cpu with the MLPs dynamically quantized to int8 (MatMulInteger); tables fp32"
    precision = "int8-dense"

    def lower(self, model: RecModel, example: Batch, out_dir: Path,
              external_threshold: int = PROTOBUF_LIMIT, **options: Any) -> CompiledPath:
        external = model.dense_bytes() + model.embedding_bytes() > external_threshold
        quantized = save_quantized(export_onnx(model, example), out_dir / MODEL_FILE, external)
        return CompiledPath(self.name, _files(out_dir),
                            {"opset": OPSET, "quantized_matmuls": quantized,
                             "weights": "int8 per output channel", "activations": "uint8 dynamic"})


def save_quantized(onnx_program, path: Path, external: bool,
                   prefixes: tuple[str, ...] = MLP_PREFIXES) -> int:
    """Write ``onnx_program`` to ``path`` with the MLP Gemms (weights named with ``prefixes``)
    quantized as the module docstring says; returns how many MatMuls were quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    to_quantize = gemm_to_matmul(onnx_program.model, prefixes)
    if not to_quantize:
        raise RewriteError("onnx-cpu-int8: the exported graph has no MLP Gemm to quantize")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet_root_logger():
        fp32 = Path(tmp) / path.name
        onnx_program.save(str(fp32), external_data=external)
        _drop_value_info(fp32)
        quantize_dynamic(fp32, path, weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=to_quantize, use_external_data_format=external,
                         extra_options={"MatMulConstBOnly": True})
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    missing = [op for op in QUANTIZED_OPS if op not in ops]
    if missing or ops.count("MatMulInteger") != len(to_quantize):
        raise RewriteError(f"onnx-cpu-int8: quantization left the MLPs in fp32 (no {missing}, "
                           f"{ops.count('MatMulInteger')} of {len(to_quantize)} MatMuls quantized)")
    return len(to_quantize)


def _drop_value_info(path: Path) -> None:
    """Remove the exporter's intermediate shape annotations before quantizing: the quantizer's
    strict shape inference rejects some of them (e.g. a gathered TT core slice annotated with the
    trace's length), while recomputing them from the graph is exact."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    del m.graph.value_info[:]
    onnx.save(m, str(path))


@register_target("onnx-cuda")
class OnnxCuda(OnnxCpu):
    summary = "onnx-cpu's graph on onnxruntime's CUDA provider"
    devices = ("cuda",)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def unavailable(self) -> str | None:
        why = super().unavailable()
        if why:
            return why.replace("CUDAExecutionProvider", "CUDAExecutionProvider (needs the "
                               "onnxruntime-gpu package and a CUDA device)")
        return None


@contextmanager
def _quiet_root_logger():
    """quantize_dynamic logs a 'consider pre-processing' warning on the root logger every call;
    pre-processing (shape inference + optimisation) adds nothing for MatMul-only quantization."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _files(out_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())

