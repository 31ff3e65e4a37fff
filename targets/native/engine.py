"""``torch-fast``: eager PyTorch plus C++ kernels, the levers of issue 10 applied at load.

Before (the ``torch`` path): 26 ``embedding_bag`` calls (one per feature), fp32 MLPs (MKL),
``DotInteraction`` over a list of [B, d] tensors (stack, bmm, gather, concat).
After, same weights, same math:
* tables: every table's fused lookup (``Representation.fused_lookup``: stored rows in fp32, fp16
  or FBGEMM's row-wise int8 / int4 / int2, hash / QR index transforms, MD and prune-dims
  projections, hot-cold and prune-dims remaps, TT cores and cache) in one huge-page buffer,
  decoded in registers inside the gather, never as a gathered fp32 copy
  (``targets.native.fast_kernels.TableStore``); a compute representation (DHE, hybrid, MEM-REC,
  ROBE, bf16 tables) is pooled by its own ``forward`` and read by the same call (``pre``);
* memory: glibc malloc told to keep freed buffers below ``KEEP_FREED_BYTES`` (process-wide), so
  each call's activations reuse pages instead of page-faulting fresh ones in;
* form ``small``: the whole model as one C++ call (``small_forward``: bf16 weights, f32
  activations and accumulation, z rounded to bf16 as below), one sample after another;
* form ``batched``: x = bottom(dense) in bf16 (``fast_kernels.fast_mlp``: the whole MLP as one call on AMX
  tiles where the CPU has AMX, else oneDNN with prepacked weights, in fp32 on CPUs without
  AVX512-BF16), then ONE C++ call pools every
  bag and computes the dot interaction per sample, writing the top MLP's bf16 input
  z = [x, <t_i, t_j> ...] directly (``embed_interact``), then the top MLP in bf16 the same way,
  its width-1 last layer accumulated in fp32.
``torch-fast-int8`` adds form ``int8``: int8 MLPs, the fused lookup + interaction then writing z
quantized per row (``embed_interact_q8``).  Which form runs which batch size, and each MLP's split
into forms, are measured at compile (``targets.native.batch_forms``, ``targets.native.mlp_plan``).
The runner takes the canonical batch directly (``canonical``), skipping the per-feature split.
Any representation is accepted, each table pooling by its own mode, as long as every table pools
into one dim; the dot interaction, and for ``torch-fast`` also DLRM_DCN (``FastDCN``: the fused
lookup, then the cross net and the MLPs); another interaction is refused by name.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewrite.core.batch import Batch
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel, interaction_width
from targets.base import CompiledPath, register_target
from targets.pytorch.eager import TorchEager

# Which form runs which batch size is measured at compile (``targets.native.batch_forms``); a path
# without a measurement that applies here uses these: the small form up to SMALL_MAX_BATCH, int8
# (torch-fast-int8) from INT8_MIN_BATCH.
SMALL_MAX_BATCH = 8      # samples (Kaggle model, Intel AMX host: B=4 0.09 vs 0.17 ms on oneDNN)
INT8_MIN_BATCH = 64      # samples
KEEP_FREED_BYTES = 32 << 20   # glibc's largest mmap threshold: per-call buffers below it are reused, not faulted in


def padded_interaction_width(model: RecModel) -> int:
    """kp: the top MLP's input width (``rewrite.core.model.interaction_width``) zero-padded to a
    multiple of 32 (one AMX tile's K, so the top MLP's tile loads read z in place)."""
    dims = [model.embeddings[t].dim for t in model.feature_tables]
    return -(-interaction_width(model.spec, dims) // 32) * 32


def form_by_batch(plan: dict[str, Any] | None, default: list[list[Any]], large: str):
    """``form_for(batch)`` from a plan's measured ``batch_forms`` (``targets.native.batch_forms``),
    else from ``default`` ranges."""
    from targets.native.batch_forms import FormByBatch

    measured = (plan or {}).get("batch_forms")
    return FormByBatch(measured["ranges"], measured["large"]) if measured else FormByBatch(default, large)


def fusable(model: RecModel) -> None:
    """RewriteError unless every table pools into one dim (the dot interaction's)."""
    dims = {rep.dim for rep in model.embeddings.values()}
    if len(dims) != 1:
        raise RewriteError(f"torch-fast fuses tables of one dim (the dot interaction's), found dims {sorted(dims)}")


class FusedTables(nn.Module):
    """Every table's fused lookup in one huge-page buffer (``TableStore``); feature f's id i must
    be below its table's rows (the C++ kernels check it).  Tables without a fused lookup (compute
    representations) are pooled here by their own ``forward`` into ``pre`` [B, P, d], which the
    kernels read in their place."""

    def __init__(self, model: RecModel):
        super().__init__()
        fusable(model)
        from targets.native.fast_kernels import KIND_CODES, store_tables

        names = list(model.embeddings)
        self.dim = model.embeddings[names[0]].dim
        self.store = store_tables([model.embeddings[t] for t in names],
                                  [names.index(t) for t in model.feature_tables], self.dim)
        pre = [f for f, row in enumerate(self.store.feat.tolist()) if row[0] == KIND_CODES["pre"]]
        self.pre_features = pre
        self.computed = nn.ModuleList([model.embeddings[model.feature_tables[f]] for f in pre])
        self.no_pre = torch.empty(0)

    @property
    def kinds(self) -> list[str]:
        """Each feature's lookup kind (``pre``: pooled by torch before the kernel)."""
        from targets.native.fast_kernels import KIND_CODES

        names = {v: k for k, v in KIND_CODES.items()}
        return [names[int(c)] for c in self.store.feat[:, 0]]

    @property
    def formats(self) -> list[str]:
        """Each feature's row format, as the kernels decode it (``pre`` features: None)."""
        from targets.native.fast_kernels import FORMAT_CODES

        names = {v: k for k, v in FORMAT_CODES.items()}
        return [None if k == "pre" else names[int(c)] for k, c in zip(self.kinds, self.store.feat[:, 1])]

    def pre(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """pre [B, P, d]: the bags of the ``pre`` features pooled by their representations (an
        empty tensor when there are none)."""
        if not self.pre_features:
            return self.no_pre
        nf = self.store.feat.shape[0]
        batch = (offsets.numel() - 1) // nf
        out = torch.empty(batch, len(self.pre_features), self.dim)
        bounds = offsets[[f * batch for f in self.pre_features] + [(f + 1) * batch for f in self.pre_features]].tolist()
        n = len(self.pre_features)
        with torch.inference_mode():
            for k, (f, rep) in enumerate(zip(self.pre_features, self.computed)):
                lo, hi = bounds[k], bounds[n + k]
                out[:, k] = rep(indices[lo:hi], offsets[f * batch:(f + 1) * batch + 1] - lo)
        return out


class FastDLRM(nn.Module):
    """bottom MLP -> fused lookup + dot interaction -> top MLP, each batch size on its fastest form."""

    def __init__(self, model: RecModel, plan: dict[str, Any] | None = None):
        """``plan``: a measured ``mlp_plan`` (``targets.native.mlp_plan``) for the bf16 MLPs, or
        None for the tier's one-form default."""
        from targets.native.fast_kernels import PAIR_ORDERS, fast_mlp, kernels, small_model
        from targets.native.mlp_plan import planned_mlp

        super().__init__()
        if model.spec.interaction != "dot":
            raise RewriteError(f"torch-fast supports the dot interaction, not {model.spec.interaction!r}")
        self.kernels = kernels()            # bound once: kernels() resolves the ISA tier on every call
        self.kernels.keep_freed_memory(KEEP_FREED_BYTES)
        self.tables = FusedTables(model)
        self.register_buffer("pairs", model.interaction.flat_pairs, persistent=False)
        self.order = PAIR_ORDERS[model.spec.pairs]
        self.kp = padded_interaction_width(model)
        self.bottom16 = planned_mlp(model.bottom, plan, "bottom", lambda: fast_mlp(model.bottom))
        self.top16 = planned_mlp(model.top, plan, "top", lambda: fast_mlp(model.top, k_in=self.kp), self.kp)
        self.form_for = form_by_batch(plan, [[SMALL_MAX_BATCH, "small"]], "batched")
        self.small = small_model(self.tables.store, model.bottom, model.top, model.spec.n_dense, self.order, self.kp)

    def lookup_interact(self, x: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                        int8_kp: int | None = None):
        """z bf16 [B, kp] = [x, <t_i, t_j> kept pairs, 0 ...] straight from the canonical batch; with
        ``int8_kp``, z quantized per row instead: (q int8 [B, int8_kp], s [B])."""
        t, k = self.tables, self.kernels
        fn, kp = (k.embed_interact, self.kp) if int8_kp is None else (k.embed_interact_q8, int8_kp)
        w, feat, d = t.store.args()
        return fn(w, indices, offsets, feat, d, t.pre(indices, offsets), x, self.order, kp, False)

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.run_form(self.form_for(dense.shape[0]), dense, indices, offsets)

    def run_form(self, form: str, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The logits by one form: ``small`` (one C++ call) or ``batched`` (bf16 MLPs around the
        fused lookup + interaction)."""
        if form == "small":
            return self.small(dense.contiguous(), indices, offsets, self.tables.pre(indices, offsets))
        x = self.bottom16(dense)
        return self.top16(self.lookup_interact(x, indices, offsets)).squeeze(1)


class FastDCN(nn.Module):
    """DLRM_DCN (DLRMv2's shape): x = bottom(dense) in fp32 (oneDNN, prepacked), every bag pooled
    by ONE C++ call (``gather_bags``: [B, F, d] f32, multi-hot bags, any d up to the kernels'
    MAX_D, each table in its stored format), then the low-rank cross net over
    x_0 = [x, e_0 .. e_{F-1}] in fp32 (the model's own ``DCNInteraction``: two GEMMs of rank r per
    layer; its products x_0 * (W V x_l + b) amplify a bf16 bottom's rounding past the bf16-dense
    tolerance, so the bottom stays fp32), then the top MLP (``fast_mlp``, its width-1 last layer
    accumulated in fp32).  One form for every batch size."""

    def __init__(self, model: RecModel):
        from targets.native.fast_kernels import OneDnnMlp, fast_mlp, kernels

        super().__init__()
        if model.spec.interaction != "dcn":
            raise RewriteError(f"FastDCN runs the dcn interaction, not {model.spec.interaction!r}")
        self.kernels = kernels()
        self.kernels.keep_freed_memory(KEEP_FREED_BYTES)
        self.tables = FusedTables(model)
        self.bottom, self.top = OneDnnMlp(model.bottom, dtype=torch.float32), fast_mlp(model.top)
        self.cross = model.interaction

    @staticmethod
    def form_for(batch: int) -> str:
        return "small"                  # one form for every batch size

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.small(dense, indices, offsets, self.tables.pre(indices, offsets))

    @torch.inference_mode()
    def small(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
              pre: torch.Tensor) -> torch.Tensor:
        """The whole form given the computed tables' pooled rows ``pre`` (``FusedTables.pre``):
        ``FastRunner``'s entry for tiny batches, as ``FastDLRM.small`` is."""
        w, feat, d = self.tables.store.args()
        e = self.kernels.gather_bags(w, indices, offsets, feat, d, pre)
        return self.top(self.cross(self.bottom(dense), [e.flatten(1)])).squeeze(1)


def fast_net(model: RecModel) -> nn.Module:
    """The fast form of ``model``: ``FastDLRM`` (dot) or ``FastDCN`` (dcn); other interactions refused."""
    if model.spec.interaction == "dcn":
        return FastDCN(model)
    return FastDLRM(model)


class FastRunner:
    """The runner contract ``(dense, bags) -> logits`` plus ``canonical(dense, indices, offsets)``."""

    def __init__(self, net: FastDLRM | FastDCN):
        self.net = net

    def canonical(self, dense: np.ndarray, indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Batches whose form is ``small`` straight into ``SmallModel`` (C++, no autograd to turn
        off: entering inference mode and ``nn.Module.__call__`` were a quarter of a batch-1
        ``predict``, 0.048 -> 0.037 ms here); the others through the module."""
        d, i, o = torch.from_numpy(dense), torch.from_numpy(indices), torch.from_numpy(offsets)
        if self.net.form_for(d.shape[0]) == "small":
            return self.net.small(d.contiguous(), i, o, self.net.tables.pre(i, o)).numpy()
        with torch.inference_mode():
            return self.net(d, i, o).numpy()

    def __call__(self, dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
        idx, offs = bags[0::2], bags[1::2]
        base = np.cumsum([0] + [len(i) for i in idx])
        offsets = np.concatenate([o[:-1] + b for o, b in zip(offs, base)] + [base[-1:]])
        return self.canonical(dense, np.concatenate(idx).astype(np.int64), offsets.astype(np.int64))


@register_target("torch-fast")
class TorchFast(TorchEager):
    summary = ("every representation's lookup fused in one C++ call with the interaction (huge-page tables), "
               "MLPs on AMX / bf16 / fp32 oneDNN by ISA tier")
    precision = "bf16-dense"
    interactions = ("dot", "dcn")

    def unavailable(self) -> str | None:
        from targets.native.cpp_extension import compiler_missing
        from targets.native.fast_kernels import onednn_missing

        return compiler_missing() or onednn_missing()

    def refuse(self, model: RecModel) -> None:
        """RewriteError, before anything is written, naming why this target cannot take ``model``."""
        fusable(model)
        if model.spec.interaction not in self.interactions:
            raise RewriteError(f"{self.name} supports the {' and '.join(self.interactions)} interaction"
                               f"{'s' if len(self.interactions) > 1 else ''}, not {model.spec.interaction!r}")

    def default_mlp_form(self) -> str:
        """The form of this path's MLPs without a measured plan (``targets.native.mlp_plan``)."""
        from targets.native.mlp_plan import form_missing

        return "bf16" if form_missing("bf16") is None else "fp32"

    # the forms of ``net`` per batch size (``run_form``), the large-batch one last
    batch_forms = ("small", "batched")

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        """The model file, and for a dot-interaction model the forms measured on this host
        (``options["mlp_plan"]``): each MLP's split (``targets.native.mlp_plan``), then which form
        runs each batch size (``batch_forms``, on a proxy of the model with those splits)."""
        from targets.native import batch_forms
        from targets.native.mlp_plan import one_thread, plan_mlps

        self.refuse(model)
        compiled = super().lower(model, example, out_dir, **options)
        if model.spec.interaction == "dot":
            plan = plan_mlps(self.name, self.default_mlp_form(), model.bottom, model.top, padded_interaction_width(model))
            proxy = batch_forms.proxy_model(model)
            net = self.net(proxy, plan).eval()
            with one_thread():
                plan["batch_forms"] = batch_forms.measure(
                    {form: functools.partial(net.run_form, form) for form in self.batch_forms}, proxy,
                    self.batch_forms[-1])
            compiled.options["mlp_plan"] = plan
        return compiled

    def net(self, model: RecModel, plan: dict[str, Any] | None) -> nn.Module:
        return FastDLRM(model, plan) if model.spec.interaction == "dot" else fast_net(model)

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> FastRunner:
        """The fast form, its MLPs split as the recorded plan says where it applies in this
        process (``plan_applies``), else on the tier's default form."""
        from targets.native.mlp_plan import plan_applies

        if threads:
            torch.set_num_threads(threads)
        model = self.load_model(out_dir)
        plan = compiled.options.get("mlp_plan")
        net = self.net(model, plan if plan_applies(plan) is None else None).eval()
        model.embeddings = nn.ModuleDict()                 # drop the unfused copies of the tables
        return FastRunner(net)


class FastInt8DLRM(FastDLRM):
    """``FastDLRM`` with a third form, ``int8``: int8 MLPs (``targets.native.int8_kernels.int8_mlp``)
    around the fused lookup + interaction, which then writes the top MLP's input quantized per row
    (``embed_interact_q8``).  Which form runs which batch size: measured at compile
    (``batch_forms``), else ``small`` up to SMALL_MAX_BATCH, ``batched`` below INT8_MIN_BATCH."""

    def __init__(self, model: RecModel, plan: dict[str, Any] | None = None):
        """``plan``: a measured ``mlp_plan``: the int8 form's MLP splits (segments in int8, bf16 or
        fp32) and the forms by batch size; None for int8 throughout and the default sizes."""
        from targets.native.int8_kernels import int8_mlp
        from targets.native.mlp_plan import planned_mlp

        why = int8_mlps_wrong(model)
        if why:
            raise RewriteError(f"torch-fast-int8 cannot run this model here: {why}")
        super().__init__(model)
        self.bottom8 = planned_mlp(model.bottom, plan, "bottom", lambda: int8_mlp(model.bottom))
        self.top8 = planned_mlp(model.top, plan, "top", lambda: int8_mlp(model.top), self.kp)
        # the fused interaction writes z quantized where the top MLP starts in int8, else bf16
        self.top_kp8 = getattr(self.top8, "kp", None)
        self.form_for = form_by_batch(plan, [[SMALL_MAX_BATCH, "small"], [INT8_MIN_BATCH - 1, "batched"]], "int8")

    def run_form(self, form: str, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``FastDLRM.run_form``, and ``int8``: the int8 MLPs around the lookup + interaction."""
        if form != "int8":
            return super().run_form(form, dense, indices, offsets)
        x = self.bottom8(dense)
        if self.top_kp8 is None:
            return self.top8(self.lookup_interact(x, indices, offsets)).squeeze(1)
        return self.top8.from_quant(*self.lookup_interact(x, indices, offsets, self.top_kp8)).squeeze(1)


def int8_mlps_wrong(model: RecModel) -> str | None:
    """Why ``model``'s int8 MLPs would compute wrong numbers in this process (``int8_mlp_wrong``:
    ``Int8Mlp`` on an inexact ``torch._int_mm``), or None."""
    from targets.native.int8_kernels import int8_mlp_wrong

    for name, mlp in (("bottom", model.bottom), ("top", model.top)):
        why = int8_mlp_wrong(mlp)
        if why:
            return f"the {name} MLP: {why}"
    return None


@register_target("torch-fast-int8")
class TorchFastInt8(TorchFast):
    summary = "torch-fast with int8 MLPs (one AVX512-VNNI or AVX2 call each, else _int_mm), the fused lookup + interaction writing int8"
    precision = "int8-dense"
    interactions = ("dot",)

    def unavailable(self) -> str | None:
        """``TorchFast``'s reasons, and where no one-call int8 kernel runs in this process and
        ``torch._int_mm`` is inexact (``int8_mlp_wrong``): every MLP would come out saturated."""
        from targets.native.int8_kernels import int8_mlp_wrong

        return super().unavailable() or int8_mlp_wrong()

    def refuse(self, model: RecModel) -> None:
        super().refuse(model)
        why = int8_mlps_wrong(model)
        if why:
            raise RewriteError(f"{self.name} cannot run this model here: {why}")

    batch_forms = ("small", "batched", "int8")

    def default_mlp_form(self) -> str:
        return "int8"

    def net(self, model: RecModel, plan: dict[str, Any] | None) -> nn.Module:
        return FastInt8DLRM(model, plan)
