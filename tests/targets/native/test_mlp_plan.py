"""The fast engine's forms, chosen by measurement at compile: each MLP's per-layer split
(targets.native.mlp_plan) and the form per batch size (targets.native.batch_forms); the
searches, mixed splits against eager at every ISA tier, and the plan a bundle records."""

import pytest
import torch

from rewrite.core import isa
from rewrite.core.errors import RewriteError
from rewrite.training import table_dlrm
from targets.base import get_target
from targets.native.engine import FastDLRM, FastInt8DLRM, FastRunner
from targets.native.int8_kernels import int8_mlp_wrong
from targets.native.batch_forms import GRID, FormByBatch
from targets.native.mlp_plan import (MARGIN, MixedMlp, choose_split, cheapest_splits, form_missing, plan_applies)
from tests.targets.checks import assert_matches_eager, lower_and_load

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    """Three layers per MLP, so a split can put a segment in the middle; trained-like tables."""
    m = table_dlrm([700, 90, 5, 33], bottom=(64, 32, 16), top=(64, 32, 1), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in m.embeddings.values():
            t.weight.copy_(torch.randn(t.weight.shape, generator=g) * 0.1)
    return m.eval()


def plan(default: str, bottom: list, top: list) -> dict:
    """A recorded plan for this process, with the given splits (as ``plan_mlps`` writes them)."""
    layers = [[0, 0]] * 3
    return {"cpu": isa.cpu_model(), "tier": isa.active_tier(),
            "bottom": {"segments": bottom, "default": default, "layers": layers},
            "top": {"segments": top, "default": default, "layers": layers}}


def test_a_split_is_taken_only_when_it_beats_the_fewer_segments_by_the_margin():
    cost = {("int8", 0, 3): 10.0, ("int8", 0, 1): 3.0, ("int8", 1, 3): 6.0, ("fp32", 0, 1): 1.0,
            ("fp32", 1, 3): 9.0, ("fp32", 0, 3): 12.0}
    splits = cheapest_splits(3, cost)
    assert splits[1] == (10.0, [("int8", 0, 3)])
    assert splits[2] == (7.0, [("fp32", 0, 1), ("int8", 1, 3)])
    assert 3 not in splits            # (fp32 0-1, int8 1-3) has no third segment in another form
    assert choose_split(3, cost, ("int8", 0, 3)) == (7.0, [("fp32", 0, 1), ("int8", 1, 3)])
    near_tie = {**cost, ("fp32", 0, 1): 10.0 * (1 - MARGIN) - 6.0 + 0.01}
    assert choose_split(3, near_tie, ("int8", 0, 3)) == (10.0, [("int8", 0, 3)])


def test_neighbouring_segments_differ_in_form_and_an_uncovered_mlp_is_refused():
    cost = {("fp32", 0, 1): 1.0, ("fp32", 1, 2): 1.0, ("fp32", 0, 2): 5.0}
    assert cheapest_splits(2, cost) == {1: (5.0, [("fp32", 0, 2)])}
    with pytest.raises(RewriteError, match="no split of this MLP's layers"):
        choose_split(3, {("int8", 0, 1): 1.0}, ("int8", 0, 3))


@pytest.mark.usefixtures("isa_tier")
@pytest.mark.parametrize("bottom, top", [
    ([["fp32", 0, 1], ["int8", 1, 3]], [["fp32", 0, 1], ["int8", 1, 3]]),     # top reads bf16 z
    ([["int8", 0, 2], ["fp32", 2, 3]], [["int8", 0, 1], ["fp32", 1, 3]]),     # top reads int8 z
])
def test_int8_path_with_mixed_splits_matches_eager(model, bottom, top):
    if int8_mlp_wrong():
        pytest.skip(f"torch-fast-int8 cannot run here: {int8_mlp_wrong()}")
    net = FastInt8DLRM(model, plan("int8", bottom, top)).eval()
    for mlp, split in ((net.bottom8, bottom), (net.top8, top)):
        assert type(mlp) is MixedMlp and mlp.forms == [form for form, _, _ in split]
    assert (net.top_kp8 is None) == (top[0][0] != "int8")
    assert assert_matches_eager(FastRunner(net), model, "int8-dense") > 0


@pytest.mark.usefixtures("isa_tier")
def test_bf16_path_with_a_mixed_split_matches_eager(model):
    why = form_missing("bf16")
    if why:
        pytest.skip(f"no bf16 form at this tier: {why}")
    net = FastDLRM(model, plan("bf16", [["fp32", 0, 1], ["bf16", 1, 3]], [["bf16", 0, 2], ["fp32", 2, 3]])).eval()
    assert net.bottom16.forms == ["fp32", "bf16"] and net.top16.forms == ["bf16", "fp32"]
    assert assert_matches_eager(FastRunner(net), model, "bf16-dense") > 0


@pytest.mark.usefixtures("isa_tier")
@pytest.mark.parametrize("name", ["torch-fast", "torch-fast-int8"])
def test_compile_records_the_measured_plan_and_load_follows_it(model, tmp_path, name):
    target = get_target(name)
    if target.unavailable():
        pytest.skip(f"{name} cannot run here: {target.unavailable()}")
    compiled, runner = lower_and_load(target, model, tmp_path)
    recorded = compiled.options["mlp_plan"]
    assert (recorded["cpu"], recorded["tier"], recorded["threads"]) == (isa.cpu_model(), isa.active_tier(), 1)
    assert recorded["forms"] == [f for f in ("int8", "bf16", "fp32") if f in recorded["forms"]]
    for which, mlp in (("bottom", model.bottom), ("top", model.top)):
        entry = recorded[which]
        assert entry["default"] == target.default_mlp_form()
        stops = [b for _, _, b in entry["segments"]]
        assert [a for _, a, _ in entry["segments"]] == [0] + stops[:-1] and stops[-1] == 3
        assert all(form in recorded["forms"] for form, _, _ in entry["segments"])
        assert entry["default_ms"] == entry["timings"][f"{entry['default']} 0-2"] > 0
        assert entry["ms"] <= entry["default_ms"]
        module = getattr(runner.net, which + ("8" if name == "torch-fast-int8" else "16"))
        assert (type(module) is MixedMlp) == (entry["segments"] != [[entry["default"], 0, 3]])
    by_batch = recorded["batch_forms"]
    forms = list(target.batch_forms)
    assert by_batch["grid"] == list(GRID) and by_batch["large"] == forms[-1] and set(by_batch["timings"]) == set(forms)
    for k, b in enumerate(GRID):            # each size runs the form measured fastest there
        fastest = min(forms, key=lambda f: by_batch["timings"][f][k])
        assert runner.net.form_for(b) == fastest
    assert runner.net.form_for(GRID[-1] + 1) == forms[-1]
    assert assert_matches_eager(runner, model, target.precision) > 0


def test_form_by_batch_covers_each_size_by_the_first_range_that_reaches_it():
    form_for = FormByBatch([[1, "small"], [8, "int8"], [32, "batched"]], "int8")
    assert [form_for(b) for b in (1, 2, 8, 9, 32, 33, 10_000)] == [
        "small", "int8", "int8", "batched", "batched", "int8", "int8"]
    assert FormByBatch([], "batched")(1) == "batched"


@pytest.mark.usefixtures("isa_tier")
def test_a_plan_measured_elsewhere_or_needing_a_missing_form_is_not_applied(model):
    if int8_mlp_wrong():
        pytest.skip(f"torch-fast-int8 cannot run here: {int8_mlp_wrong()}")
    mixed = plan("int8", [["fp32", 0, 1], ["int8", 1, 3]], [["int8", 0, 3]])
    assert plan_applies(mixed) is None
    assert plan_applies(None) == "no plan recorded"
    elsewhere = dict(mixed, tier="amx" if isa.active_tier() != "amx" else "avx2")
    assert plan_applies(elsewhere).startswith(f"measured on {isa.cpu_model()} at tier ")
    if form_missing("bf16"):
        needs_bf16 = plan("int8", [["bf16", 0, 1], ["int8", 1, 3]], [["int8", 0, 3]])
        assert plan_applies(needs_bf16) == f"bf16: {form_missing('bf16')}"
