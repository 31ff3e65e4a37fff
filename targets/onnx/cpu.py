"""ONNX Runtime targets: the whole model as one ONNX graph run by onnxruntime.

Before: a RecModel (any representations built from gather / matmul / elementwise / segment-sum).
After:  ``model.onnx`` (opset 18; weights in ``model.onnx.data`` above 2 GB), inputs
``dense [B, n_dense]``, ``indices_f [n_f]``, ``offsets_f [B + 1]`` per feature, output
``logits [B]``; no ``Loop``: tables pool through the ``rewrite.core.bag_ops`` ops, which
``targets.onnx.bags`` translates (Gather, then an If: the rows themselves when every bag holds
one id, else ScatterND(add) over CumSum bag ids; docs/lowering.md).

Exporter: ``torch.onnx.export(dynamo=True)`` of the ``torch.export`` program (``export_program``
inside ``bag_ops.lowering()``, with ``onnx_bags.TRANSLATIONS`` as custom translations).
Both exporters gave a correct, Loop-free graph for the scatter-add segment sum; the dynamo one is the
maintained one, states offsets = batch + 1 symbolically, and its onnxscript optimizer folds
constants: on a 4-table composite model (table, QR, MD, fp16) its graph ran 0.053 ms at B=1
and 2.74 ms at B=2048 vs 0.097 / 3.05 ms for the legacy TorchScript exporter's graph (1 thread,
ORT 1.31, 20 fresh batches, 5 alternating rounds, medians; a one-off script, 2026-11).  Cost:
export takes ~3 s instead of ~0.4 s.

The dot interaction is exported in the form of ``targets.onnx.interaction`` (one GatherElements
with int32 indices instead of an element-by-element Gather).

Loading (``onnx_session``): the tables of a model above 2 GB load into huge pages
(``targets.onnx.huge_pages``).

``onnx-cpu-int8``: the MLPs' Gemm nodes become MatMul + Add (onnxruntime's ``quantize_dynamic``
quantizes MatMul, not Gemm), then only those MatMuls are quantized:
    y = x W + b  ->  DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q) * (s_x s_W) + b
with per-output-channel int8 weights; tables' Gathers and the interaction stay fp32.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from rewrite.core import bag_ops
from rewrite.core.batch import Batch
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from targets.base import CompiledPath, Runner, Target, bag_input_names, export_program, register_target
from targets.onnx.huge_pages import huge_page_initializers
from targets.onnx.interaction import int32_pair_indices, onnx_form

OPSET = 18
MODEL_FILE = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3          # bytes: a protobuf message cannot exceed 2 GiB
MLP_PREFIXES = ("model.bottom.", "model.top.")   # initializer names of the MLP weights
QUANTIZED_OPS = ("DynamicQuantizeLinear", "MatMulInteger")


def export_onnx(model: RecModel, example: Batch):
    """ONNXProgram of ``ExportedBags(model)``: dynamic batch and lookup counts, opset 18; the dot
    interaction in ``targets.onnx.interaction``'s form, its pair indices int32."""
    import torch

    from targets.onnx.bags import TRANSLATIONS

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
                           "over bags in a representation); use rewrite.core.embedding.segment_sum")
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


def onnx_session(path: Path, threads: int | None, providers: list[str]):
    """onnxruntime session of ``path`` with ``session_options(threads)``; on the CPU provider
    alone, the large external initializers in huge pages (``onnx_huge_pages``), kept
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

