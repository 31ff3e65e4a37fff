"""TorchRec DLRM_DCN (low-rank DCN v2 interaction): load, run, capture, inspect, save."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite.cli import main
from rewrite.core.synthetic import multi_hot_batch
from tests.rewrite.formats.test_torchrec import assert_same, rows_of
from tests.rewrite.formats.torchrec_ref import DLRMTrain, RefDLRM, criteo_like
from tests.tolerances import assert_close

torch.set_num_threads(1)


def dcn(layers: int = 2, rank: int = 3, **kw) -> RefDLRM:
    return RefDLRM(criteo_like(4, seed=1), dim=8, n_dense=13, dense_sizes=[16, 8],
                   over_sizes=[16, 1], dcn_layers=layers, dcn_rank=rank, **kw).eval()


@pytest.mark.parametrize("bias_2d", [False, True])  # bias [N] (current TorchRec) or [N, 1] (older)
def test_dlrm_dcn_matches_reference(tmp_path, bias_2d):
    ref = dcn(bias_2d=bias_2d)
    torch.save(DLRMTrain(ref).state_dict(), tmp_path / "dcn.pt")
    model = rewrite.load(tmp_path / "dcn.pt")
    spec = model.spec
    assert (spec.interaction, spec.cross_layers, spec.cross_rank) == ("dcn", 2, 3)
    assert spec.provenance["model"] == "DLRM_DCN"
    assert model.interaction.W.shape == (2, 40, 3) and model.interaction.V.shape == (2, 3, 40)
    assert_same(ref, model, rows_of(ref))


def test_capture_runs_the_cross_net(tmp_path):
    ref = dcn(layers=3, rank=2)
    torch.save(ref.state_dict(), tmp_path / "dcn.pt")
    model = rewrite.load(tmp_path / "dcn.pt")
    gm, sites = rewrite.capture(model)
    assert [s.name for s in sites] == list(model.embeddings)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.matmul) == 6  # V then W in each of 3 layers
    b = multi_hot_batch(rows_of(ref), 32, 13, 2.0, seed=7)
    with torch.no_grad():
        assert_close(gm(*b.inputs()), ref(*b.inputs()), "checkpoint-logits", "captured DCN vs the reference")


def test_native_round_trip_and_with_tables(tmp_path):
    ref = dcn()
    torch.save(ref.state_dict(), tmp_path / "dcn.pt")
    model = rewrite.load(tmp_path / "dcn.pt")
    rewrite.save(model, tmp_path / "dcn.safetensors")
    again = rewrite.load(tmp_path / "dcn.safetensors")
    assert again.spec == model.spec
    b = multi_hot_batch(rows_of(ref), 32, 13, 2.0, seed=8)
    with torch.no_grad():
        assert torch.equal(again(*b.inputs()), model(*b.inputs()))
        # replacing tables must keep the trained cross net, not a fresh one
        assert torch.equal(model.with_tables({})(*b.inputs()), model(*b.inputs()))
    assert model.dense_bytes() == sum(p.numel() * 4 for p in ref.parameters()) - model.embedding_bytes()


def test_inspect_shows_cross_net(tmp_path):
    torch.save(dcn().state_dict(), tmp_path / "dcn.pt")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "dcn.pt"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["interaction"], info["cross_layers"], info["cross_rank"]) == ("dcn", 2, 3)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "dcn.pt")])
    assert "interaction dcn (2 cross layers, rank 3)" in res.output


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__("inter_arch.crossnet.V_kernels.1", torch.zeros(3, 39)),
     r"cross layer 1: W \(40, 3\), V \(3, 39\), bias \(40,\) do not fit width 40"),
    (lambda sd: sd.pop("inter_arch.crossnet.V_kernels.0"), r"'inter_arch.crossnet.V_kernels.0' is missing"),
    (lambda sd: (sd.__setitem__("inter_arch.crossnet.W_kernels.1", torch.zeros(40, 2)),
                 sd.__setitem__("inter_arch.crossnet.V_kernels.1", torch.zeros(2, 40))),
     r"cross layers have different ranks \(3, 2\)"),
    (lambda sd: sd.__setitem__("over_arch.model.0._mlp.0._linear.weight", torch.zeros(16, 41)),
     r"over_arch layer 0 takes 41 inputs but gets 40"),
])
def test_malformed_dcn_is_refused(tmp_path, edit, message):
    sd = dcn().state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(rewrite.RewriteError, match=message):
        rewrite.load(tmp_path / "bad.pt")
