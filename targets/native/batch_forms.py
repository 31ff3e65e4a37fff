"""Which form of the fast engine runs each batch size, chosen by measurement at compile.

``FastDLRM`` has two forms: ``small`` (the whole model as one C++ call, bf16 weights, one sample
after another: its cost grows with B from the first sample) and ``batched`` (the fused lookup +
interaction between GEMM-shaped MLPs); ``FastInt8DLRM`` adds ``int8`` (the same with int8 MLPs).
Where one overtakes another depends on the CPU and its tier, so it is measured: each form is
timed at every batch size of ``GRID`` on a proxy of the model (the same spec, MLP shapes and
split, every table fp32 with at most ``PROXY_ROWS`` rows: the forms share the lookup, so the
tables' own cost is common to all and the proxy keeps the compile's memory small), every form
and size given a turn per round, timed warm (``rewrite.core.timing.interleaved_median_ms``,
``PER_TURN`` calls a turn).  The fastest form at each grid point covers
the batch sizes up to it; batches above the grid take the path's large-batch form.

The result, ``[[max_batch, form], ...]`` in increasing ``max_batch``, is recorded with its
timings in the path's ``mlp_plan`` options; ``form_for`` reads it.
"""

from __future__ import annotations

import bisect
import functools
from typing import Any, Callable

import torch

from rewrite.core.model import RecModel
from rewrite.core.timing import interleaved_median_ms, serving_batches

GRID = (1, 2, 4, 8, 16, 32, 64, 128)
PROXY_ROWS = 4096
ROUNDS = 7               # timed rounds over every form and size (medians)
PER_TURN = 4             # calls per turn, the first untimed: warm, as in a stream of one size


def proxy_model(model: RecModel) -> RecModel:
    """``model``'s spec and MLP shapes with fp32 tables of at most PROXY_ROWS rows each (random
    weights: the forms' timings do not depend on the values)."""
    from rewrite.core.embedding import TableBag

    g = torch.Generator().manual_seed(0)
    tables = {name: TableBag(min(rep.rows, PROXY_ROWS), rep.dim, weight=torch.randn(
        min(rep.rows, PROXY_ROWS), rep.dim, generator=g) * 0.1) for name, rep in model.embeddings.items()}
    return RecModel(model.spec, tables).eval()


def measure(forms: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]], proxy: RecModel,
            large_form: str) -> dict[str, Any]:
    """Time every form at every GRID batch size (``serving_batches``: one id per bag): the
    ranges (module docstring) and the timings behind them, in ms."""
    rows = [proxy.embeddings[t].rows for t in proxy.feature_tables]
    calls = {}
    for b in GRID:
        batch = [torch.from_numpy(a) for a in serving_batches(rows, proxy.spec.n_dense, b, 1, seed=0)[0]]
        for name, form in forms.items():
            calls[(name, b)] = functools.partial(form, *batch)
    with torch.inference_mode():
        times = interleaved_median_ms(calls, ROUNDS, per_turn=PER_TURN)
    ranges: list[list[Any]] = []
    for b in GRID:
        fastest = min(forms, key=lambda name: times[(name, b)])
        if ranges and ranges[-1][1] == fastest:
            ranges[-1][0] = b
        else:
            ranges.append([b, fastest])
    if ranges[-1][1] == large_form:
        ranges.pop()                    # the large-batch form covers everything above the last range
    return {"ranges": ranges, "large": large_form, "grid": list(GRID),
            "timings": {name: [round(times[(name, b)], 4) for b in GRID] for name in forms}}


class FormByBatch:
    """``form_for(batch)``: the form of the first range whose max_batch is >= batch, else the large form."""

    def __init__(self, ranges: list[list[Any]], large: str):
        self.bounds = [int(b) for b, _ in ranges]
        self.forms = [str(f) for _, f in ranges]
        self.large = large

    def __call__(self, batch: int) -> str:
        k = bisect.bisect_left(self.bounds, batch)
        return self.forms[k] if k < len(self.forms) else self.large
