"""Each MLP's layers on their fastest form, chosen by measurement at compile.

A plan splits an MLP's L layers into consecutive segments [start, stop), each run by one form:

    int8   the tier's int8 MLP (``int8_kernels.int8_mlp``: one AVX512-VNNI or AVX2 call, else
           ``torch._int_mm`` per layer)
    bf16   ``fast_kernels.fast_mlp`` (AMX tiles, or oneDNN in bf16), where the CPU computes in bf16
    fp32   oneDNN in fp32 (``OneDnnMlp``)

A path offers the forms whose numerics its precision allows (``PATH_FORMS``: torch-fast-int8 all
three, torch-fast bf16 and fp32).  Each segment x form is timed at ``PLAN_BATCH`` samples, on
one thread, from the input that form gets in the engine (the top MLP's first segment: int8
from the fused interaction's quantized z, the others from its bf16 z; later segments from f32),
and the cheapest split follows by dynamic programming over the L(L+1)/2 segments:

    best[0] = 0,   best[j] = min over i < j and form f of  best[i] + t(i, j, f)

with neighbouring segments in different forms.  Every boundary costs what its timings include (one quantization or conversion).  The measured
split replaces the tier's one-form default, and each split with more segments the one with fewer,
only when it is at least ``MARGIN`` faster (``choose_split``), so timing noise neither flips a
bundle's numerics from one compile to the next nor adds boundaries that buy nothing.  A plan is recorded in the
path's manifest options with every timing behind it; a process of another CPU or tier, or one
that lacks a form, runs the default instead (``plan_applies``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
from torch import nn

from rewrite.core import isa
from rewrite.core.errors import RewriteError
from rewrite.core.timing import interleaved_median_ms

PLAN_BATCH = 2048        # samples: the throughput regime, where the MLPs are most of the time
PLAN_REPEATS = 7         # timed rounds over every candidate (median), after two warm-up rounds
MARGIN = 0.05            # share by which a split must beat the one kept so far (choose_split)
PATH_FORMS = {"torch-fast-int8": ("int8", "bf16", "fp32"), "torch-fast": ("bf16", "fp32")}

Segment = tuple[str, int, int]          # (form, start layer, stop layer)


def form_missing(form: str) -> str | None:
    """Why this process cannot run ``form``, or None."""
    from targets.native.amx_mlp import amx_missing
    from targets.native.fast_kernels import bf16_gemm_missing, onednn_missing
    from targets.native.int8_kernels import int8_mlp_wrong

    if form == "int8":
        return int8_mlp_wrong()
    if form == "bf16":
        return bf16_gemm_missing() if amx_missing() else None
    if form == "fp32":
        return onednn_missing()
    raise RewriteError(f"unknown MLP form {form!r} (int8, bf16, fp32)")


def layer_slice(mlp: nn.Sequential, start: int, stop: int) -> nn.Sequential:
    """Layers [start, stop) of an MLP (``int8_kernels.linears``) as an MLP of their own (shared weights)."""
    from targets.native.int8_kernels import linears

    mods: list[nn.Module] = []
    for lin, relu in linears(mlp)[start:stop]:
        mods += [lin, nn.ReLU()] if relu else [lin]
    return nn.Sequential(*mods)


def segment_missing(form: str, mlp: nn.Sequential) -> str | None:
    """Why ``form`` cannot take this segment's shape, or None: the int8 forms need a layer to
    quantize (a lone width-1 last layer is an fp32 dot product in every form) whose width is a
    multiple of 8."""
    from targets.native.int8_kernels import ALIGN, split_final

    if form == "int8" and split_final(mlp)[0][0][0].out_features % ALIGN:
        return "no leading layer whose width is a multiple of 8"
    return None


def build_segment(form: str, mlp: nn.Sequential, k_in: int | None) -> nn.Module:
    """The module running ``mlp`` (a segment) in ``form``; ``k_in`` pads the first layer's input
    (the float forms of the top MLP's first segment read the interaction's [B, kp] z in place)."""
    from targets.native.fast_kernels import OneDnnMlp, fast_mlp
    from targets.native.int8_kernels import int8_mlp

    if form == "int8":
        return int8_mlp(mlp)
    if form == "bf16":
        return fast_mlp(mlp, k_in)
    return OneDnnMlp(mlp, k_in, torch.float32)


class MixedMlp(nn.Module):
    """An MLP run segment by segment, each in its plan's form: ``forward(x f32 [B, K])``; where the
    first segment is int8, also ``from_quant(q, s)`` and ``kp`` (``Int8Mlp``'s contract)."""

    def __init__(self, mlp: nn.Sequential, plan: list[Segment], k_in: int | None = None):
        super().__init__()
        self.forms = [form for form, _, _ in plan]
        self.segments = nn.ModuleList(build_segment(form, layer_slice(mlp, a, b), k_in if a == 0 else None)
                                      for form, a, b in plan)
        self.kp = getattr(self.segments[0], "kp", None) if self.forms[0] == "int8" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for segment in self.segments:
            x = segment(x)
        return x

    def from_quant(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = self.segments[0].from_quant(q, s)
        for segment in self.segments[1:]:
            x = segment(x)
        return x


def planned_mlp(mlp: nn.Sequential, plan: dict[str, Any] | None, which: str, default: Callable[[], nn.Module],
                k_in: int | None = None) -> nn.Module:
    """The module for ``mlp`` (``which``: "bottom" or "top"): ``default()`` without a plan or where
    the plan kept the default, else ``MixedMlp`` of the plan's segments."""
    if not plan or plan[which]["segments"] == [[plan[which]["default"], 0, len(plan[which]["layers"])]]:
        return default()
    return MixedMlp(mlp, [tuple(s) for s in plan[which]["segments"]], k_in)


def cheapest_splits(n_layers: int, cost: dict[Segment, float]) -> dict[int, tuple[float, list[Segment]]]:
    """For each segment count k, the split of layers [0, n_layers) into k segments of minimum
    summed ``cost``: {k: (its cost, its segments in order)}.  Segments absent from ``cost`` are not
    allowed, and neighbours differ in form (splitting one form's run changes only the noise)."""
    best: dict[tuple[int, str | None, int], tuple[float, list[Segment]]] = {(0, None, 0): (0.0, [])}
    for stop in range(1, n_layers + 1):
        for (form, a, b), t in cost.items():
            if b != stop:
                continue
            for (at, last, k), (before, split) in list(best.items()):
                key = (stop, form, k + 1)
                if at == a and last != form and (key not in best or before + t < best[key][0]):
                    best[key] = (before + t, split + [(form, a, b)])
    out: dict[int, tuple[float, list[Segment]]] = {}
    for (at, _, k), v in best.items():
        if at == n_layers and (k not in out or v[0] < out[k][0]):
            out[k] = v
    return out


def choose_split(n_layers: int, cost: dict[Segment, float], default: Segment) -> tuple[float, list[Segment]]:
    """The split to run: starting from the one-form ``default``, each split with more segments is
    taken only if it is at least ``MARGIN`` faster than the one chosen so far (a one-segment split
    in another form likewise), so near ties keep the fewer boundaries and the default's numerics."""
    splits = cheapest_splits(n_layers, cost)
    if not splits:
        raise RewriteError("no split of this MLP's layers runs in the forms this path offers")
    chosen = (cost[default], [default]) if default in cost else splits[min(splits)]
    for k in sorted(splits):
        if splits[k][0] < (1 - MARGIN) * chosen[0]:
            chosen = splits[k]
    return chosen


def segment_timings(mlp: nn.Sequential, forms: tuple[str, ...], k_in: int | None,
                    batch: int) -> dict[Segment, float]:
    """ms per call of every segment x form this process can run, at ``batch`` samples, from the
    input the engine hands that form (module docstring)."""
    from targets.native.int8_kernels import kernels as int8_kernels, linears

    widths = [lin.in_features for lin, _ in linears(mlp)]
    n = len(widths)
    g = torch.Generator().manual_seed(0)
    calls: dict[Segment, Callable[[], Any]] = {}
    for a in range(n):
        top_input = a == 0 and bool(k_in)
        x = torch.randn(batch, k_in if top_input else widths[a], generator=g)
        for b in range(a + 1, n + 1):
            for form in forms:
                segment = layer_slice(mlp, a, b)
                if segment_missing(form, segment):
                    continue
                try:
                    module = build_segment(form, segment, k_in if top_input else None)
                except RewriteError:        # a kernel that refuses this segment's shape: not a candidate
                    continue
                if top_input and form == "int8":
                    q, s = int8_kernels().quantize_rows(x[:, :widths[0]].contiguous(), module.kp)
                    calls[(form, a, b)] = functools.partial(module.from_quant, q, s)
                else:
                    calls[(form, a, b)] = functools.partial(module, x.to(torch.bfloat16) if top_input else x)
    with torch.inference_mode():
        return interleaved_median_ms(calls, PLAN_REPEATS)


def plan_mlp(mlp: nn.Sequential, forms: tuple[str, ...], default_form: str, k_in: int | None = None,
             batch: int = PLAN_BATCH) -> dict[str, Any]:
    """Measure ``mlp``'s segments and choose its split (module docstring): ``{"segments": [[form,
    start, stop], ...], "default": form, "layers": [[K, N], ...], "ms", "default_ms", "timings":
    {"form first-last": ms}}``."""
    from targets.native.int8_kernels import linears

    n = len(linears(mlp))
    cost = segment_timings(mlp, forms, k_in, batch)
    default = (default_form, 0, n)
    best_ms, best = choose_split(n, cost, default)
    default_ms = cost.get(default)
    return {"segments": [list(s) for s in best], "default": default_form,
            "layers": [[lin.in_features, lin.out_features] for lin, _ in linears(mlp)], "ms": round(best_ms, 4),
            "default_ms": None if default_ms is None else round(default_ms, 4),
            "timings": {f"{form} {a}-{b - 1}": round(t, 4) for (form, a, b), t in sorted(cost.items(), key=str)}}


@contextlib.contextmanager
def one_thread():
    """Timings on one thread, as the bundles serve (``rewrite bench`` and ``serve`` workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def plan_mlps(path: str, default_form: str, bottom: nn.Sequential, top: nn.Sequential,
              top_k_in: int, batch: int = PLAN_BATCH) -> dict[str, Any]:
    """The manifest's ``mlp_plan`` for a dot-interaction model on ``path``: each MLP's measured
    split, with the host, tier and batch the timings came from, on one thread."""
    forms = tuple(f for f in PATH_FORMS[path] if form_missing(f) is None)
    with one_thread():
        return {"cpu": isa.cpu_model(), "tier": isa.active_tier(), "batch": batch, "threads": 1,
                "forms": list(forms), "margin": MARGIN,
                "bottom": plan_mlp(bottom, forms, default_form, None, batch),
                "top": plan_mlp(top, forms, default_form, top_k_in, batch)}


def plan_applies(plan: dict[str, Any] | None) -> str | None:
    """Why a recorded ``mlp_plan`` does not apply in this process (measured on another CPU or
    tier, or a form this process lacks), or None when it does.  A path without one runs the default."""
    if not plan:
        return "no plan recorded"
    if (plan["cpu"], plan["tier"]) != (isa.cpu_model(), isa.active_tier()):
        return f"measured on {plan['cpu']} at tier {plan['tier']}"
    for mlp in ("bottom", "top"):
        for form, _, _ in plan[mlp]["segments"]:
            why = form_missing(form)
            if why:
                return f"{form}: {why}"
    return None


def describe_plan(plan: dict[str, Any]) -> str:
    """One line for ``rewrite compile``: each MLP's split with its measured time, and the
    one-form default's where the split differs (layers numbered from 0)."""
    parts = []
    for which in ("bottom", "top"):
        entry = plan[which]
        split = " + ".join(f"{form} {a}" + (f"-{b - 1}" if b - a > 1 else "") for form, a, b in entry["segments"])
        mixed = entry["segments"] != [[entry["default"], 0, len(entry["layers"])]]
        vs = f" vs {entry['default_ms']:.2f} all {entry['default']}" if mixed and entry["default_ms"] else ""
        parts.append(f"{which} {split} ({entry['ms']:.2f} ms{vs})")
    return f"MLP forms at B={plan['batch']}: " + ", ".join(parts)
