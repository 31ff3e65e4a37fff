"""TorchRec DLRM state dicts: written from an independent plain-torch DLRM, read by rewrite.load."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite.cli import main
from rewrite.core.model import interaction_pairs
from rewrite.core.synthetic import multi_hot_batch
from tests.rewrite.formats.torchrec_ref import DLRMTrain, RefDLRM, criteo_like
from tests.tolerances import assert_close

torch.set_num_threads(1)


def batches(rows: list[int], n_dense: int):
    """Ragged multi-hot bags, ~10% empty, every table's largest id; and a one-hot-ish batch."""
    yield multi_hot_batch(rows, 64, n_dense, mean_len=3.0, seed=1)
    yield multi_hot_batch(rows, 7, n_dense, mean_len=1.0, seed=2, empty_fraction=0.4)


def assert_same(ref: RefDLRM, model: rewrite.RecModel, rows: list[int], n_dense: int = 13) -> None:
    with torch.no_grad():
        for b in batches(rows, n_dense):
            want, got = ref(*b.inputs()), model(*b.inputs())
            assert got.shape == want.shape
            assert_close(got, want, "checkpoint-logits", f"B={b.size}")


def small(**kw) -> RefDLRM:
    tables = criteo_like(5)
    return RefDLRM(tables, dim=8, n_dense=13, dense_sizes=[32, 8], over_sizes=[16, 8, 1], **kw).eval()


def rows_of(ref: RefDLRM) -> list[int]:
    bags = ref.sparse_arch.embedding_bag_collection.embedding_bags
    return [bags[t].num_embeddings for _, t in ref.features]


def test_pair_order_is_torchrecs_triu():
    for n in (2, 5, 27):
        triu = torch.triu_indices(n, n, offset=1)
        assert interaction_pairs(n, "torchrec") == list(zip(triu[0].tolist(), triu[1].tolist()))
    assert interaction_pairs(4, "torchrec") != interaction_pairs(4, "dlrm")


def test_bare_state_dict_matches_reference(tmp_path):
    ref = small()
    torch.save(ref.state_dict(), tmp_path / "dlrm.pt")
    model = rewrite.load(tmp_path / "dlrm.pt")
    assert model.spec.pairs == "torchrec" and model.spec.interaction == "dot"
    assert list(model.embeddings) == [f"t_cat_{i}" for i in range(5)]
    assert model.spec.features[0] == ("cat_0", "t_cat_0")
    assert model.spec.provenance["format"] == "torchrec"
    assert model.spec.bottom == (32, 8) and model.spec.top == (16, 8, 1)
    assert_same(ref, model, rows_of(ref))


@pytest.mark.parametrize("wrap", ["DLRMTrain", "DDP", "nested"])
def test_wrapper_prefixes_are_stripped(tmp_path, wrap):
    ref = small(seed=3)
    sd = DLRMTrain(ref).state_dict()
    if wrap == "DDP":
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrap == "nested":  # {"model": ..., "optimizer": ...} as training scripts save
        sd = {"model": {k.removeprefix("model."): v for k, v in sd.items()},
              "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}}
    torch.save(sd, tmp_path / "ckpt.pt")
    model = rewrite.load(tmp_path / "ckpt.pt")
    expected = {"DLRMTrain": "model.", "DDP": "module.model.", "nested": "model."}[wrap]
    assert model.spec.provenance["key_prefix"] == expected
    assert_same(ref, model, rows_of(ref))


def test_shared_table_and_feature_override(tmp_path):
    tables = {"t_a": 30, "t_b": 11}
    feats = [("a1", "t_a"), ("a2", "t_a"), ("b", "t_b")]
    ref = RefDLRM(tables, 4, 13, [8, 4], [8, 1], features=feats).eval()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    with pytest.raises(rewrite.RewriteError, match=r"over_arch layer 0 takes 10 inputs but gets 7"):
        rewrite.load(tmp_path / "m.pt")  # the default (one feature per table) does not fit
    model = rewrite.load(tmp_path / "m.pt", features=feats)
    assert model.spec.features == tuple(feats)
    assert_same(ref, model, [30, 30, 11])


def test_mean_pooling_override(tmp_path):
    ref = small(mode="mean", seed=5)
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    model = rewrite.load(tmp_path / "m.pt", pooling="mean")
    assert {rep.pooling for rep in model.embeddings.values()} == {"mean"}
    assert_same(ref, model, rows_of(ref))
    summed = rewrite.load(tmp_path / "m.pt")  # the default says sum: a different model
    b = multi_hot_batch(rows_of(ref), 16, 13, 3.0, seed=4)
    assert (summed(*b.inputs()) - model(*b.inputs())).abs().max() > 1e-3


def _saved(tmp_path, edit):
    sd = small().state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("over_arch.model.1.bias"), r"key 'over_arch.model.1.bias' is missing"),
    (lambda sd: sd.__setitem__("sparse_arch.embedding_bag_collection.embedding_bags.t_cat_1.weight",
                               torch.zeros(5, 6)), r"one embedding width, tables have \[6, 8\]"),
    (lambda sd: sd.__setitem__("inter_arch.interaction_branch1.model._mlp.0._linear.weight",
                               torch.zeros(2, 2)), r"DLRM_Projection's interaction branches are not supported"),
    (lambda sd: sd.__setitem__("over_arch.model.1.weight", torch.zeros(2, 8)),
     r"bias has 1 entries, weight has 2 rows"),
    (lambda sd: sd.__setitem__("dense_arch.model._mlp.1._linear.weight", torch.zeros(4, 32)),
     r"dense_arch.model._mlp.1._linear.bias has 8 entries, weight has 4 rows"),
    (lambda sd: sd.__setitem__("dense_arch.model._mlp.3._linear.weight", torch.zeros(4, 4)),
     r"not numbered 0..2 \(found \[0, 1, 3\]\)"),
    (lambda sd: sd.__setitem__("over_arch.model.0._mlp.0._linear.weight",
                               sd["over_arch.model.0._mlp.0._linear.weight"].to(torch.int64)),
     r"should be a 2-D float tensor"),
])
def test_malformed_state_dicts_are_refused(tmp_path, edit, message):
    with pytest.raises(rewrite.RewriteError, match=message):
        rewrite.load(_saved(tmp_path, edit))


def test_bad_overrides(tmp_path):
    path = _saved(tmp_path, lambda sd: None)
    with pytest.raises(rewrite.RewriteError, match=r"table\(s\) t_x that the checkpoint does not have"):
        rewrite.load(path, features=[("x", "t_x")])
    with pytest.raises(rewrite.RewriteError, match=r"no feature looks up table\(s\) t_cat_4"):
        rewrite.load(path, features=[(f"c{i}", f"t_cat_{i}") for i in range(4)])
    with pytest.raises(rewrite.RewriteError, match=r"unknown pooling 'max'"):
        rewrite.load(path, pooling="max")
    with pytest.raises(rewrite.RewriteError, match=r"option\(s\) qr_op do not apply to a torchrec checkpoint"):
        rewrite.load(path, qr_op="mult")


def test_dense_arch_must_end_at_table_width(tmp_path):
    ref = RefDLRM({"t_a": 5}, 8, 13, [16, 4], [8, 1])
    sd = ref.state_dict()
    sd["sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"] = torch.zeros(5, 8)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(rewrite.RewriteError, match=r"dense_arch ends at width 4, tables have 8"):
        rewrite.load(tmp_path / "m.pt")


def test_inspect_reports_torchrec(tmp_path):
    torch.save(small().state_dict(), tmp_path / "m.pt")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.pt"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["format"] == "torchrec" and info["interaction_pairs"] == "torchrec"
    assert [t["name"] for t in info["tables"]] == [f"t_cat_{i}" for i in range(5)]
