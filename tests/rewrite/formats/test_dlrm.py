"""Loading facebookresearch/dlrm checkpoints: every variant dlrm can save, written in its exact key
layout by an independent re-implementation (tests/reference_dlrm.py), saved the way dlrm saves it,
loaded with ``rewrite.load`` and compared with the reference on ragged batches (multi-hot, empty
and largest-index bags).  Then every malformed-key case, each with its one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rewrite
from rewrite.core.errors import RewriteError
from tests.conftest import N_DENSE, ROWS
from tests.reference_dlrm import (DLRM_Net, dlrm_inputs, save_bare_state_dict, save_data_parallel,
                                  save_like_dlrm)
from tests.tolerances import assert_close


def n_pairs(n_vectors: int, itself: bool) -> int:
    return n_vectors * (n_vectors + 1) // 2 if itself else n_vectors * (n_vectors - 1) // 2


def dlrm_net(variant: str, rows=ROWS, seed: int = 0) -> tuple[DLRM_Net, dict, list[str]]:
    """(dlrm model, rewrite.load overrides, expected representation per table) for a variant."""
    n = len(rows) + 1
    dot_top = [8 + n_pairs(n, False), 16, 8, 1]
    cases = {
        "plain-dot": (dict(m_spa=8, ln_bot=[N_DENSE, 16, 8], ln_top=dot_top), {}, ["table"] * 4),
        "plain-dot-self": (dict(m_spa=8, ln_bot=[N_DENSE, 16, 8],
                                ln_top=[8 + n_pairs(n, True), 16, 1], arch_interaction_itself=True),
                           {}, ["table"] * 4),
        "plain-cat": (dict(m_spa=4, ln_bot=[N_DENSE, 16, 6], ln_top=[6 + 4 * len(rows), 8, 1],
                           arch_interaction_op="cat"), {}, ["table"] * 4),
        # tables of 2 and 17 rows stay plain (dlrm's --qr-threshold=200)
        "qr-mult": (dict(m_spa=8, ln_bot=[N_DENSE, 16, 8], ln_top=dot_top, qr_flag=True,
                         qr_collisions=4), {}, ["table", "table", "qr", "qr"]),
        # 7 collisions: 300 and 1000 rows are not multiples, so ceil() matters
        "qr-add": (dict(m_spa=8, ln_bot=[N_DENSE, 16, 8], ln_top=dot_top, qr_flag=True,
                        qr_operation="add", qr_collisions=7), {"qr_op": "add"},
                   ["table", "table", "qr", "qr"]),
        # concat: each part is d/2 wide; with dot every table must be QR (threshold 0)
        "qr-concat-dot": (dict(m_spa=4, ln_bot=[N_DENSE, 16, 8], ln_top=dot_top, qr_flag=True,
                               qr_operation="concat", qr_collisions=4, qr_threshold=0),
                          {}, ["qr"] * 4),
        # concat with cat: plain tables under the threshold keep width d/2
        "qr-concat-cat": (dict(m_spa=4, ln_bot=[N_DENSE, 16, 6], ln_top=[6 + 4 + 4 + 8 + 8, 8, 1],
                               arch_interaction_op="cat", qr_flag=True, qr_operation="concat",
                               qr_collisions=4), {"qr_op": "concat"}, ["table", "table", "qr", "qr"]),
        # per-table dims 8/3/8/2 with base 8: t1 and t3 get a projection, t2 (dim = base) has none
        "md": (dict(m_spa=[8, 3, 8, 2], ln_bot=[N_DENSE, 16, 8], ln_top=dot_top, md_flag=True,
                    md_threshold=10), {}, ["table", "md", "table", "md"]),
    }
    kw, overrides, kinds = cases[variant]
    return DLRM_Net(ln_emb=list(rows), seed=seed, **kw), overrides, kinds


VARIANTS = ["plain-dot", "plain-dot-self", "plain-cat", "qr-mult", "qr-add", "qr-concat-dot",
            "qr-concat-cat", "md"]
REP_TOLERANCE = {"table": "table", "qr": "qr", "md": "md"}


def batches(make_batch, rows=ROWS):
    """Multi-hot with empty bags, one-id-ish short bags, and a batch of only empty bags."""
    return [make_batch(rows, batch=48, mean_len=3.0, seed=1, empty_fraction=0.2),
            make_batch(rows, batch=5, mean_len=1.0, seed=2, empty_fraction=0.3),
            make_batch(rows, batch=4, mean_len=2.0, seed=3, empty_fraction=1.0)]


def assert_matches_reference(model, net, batch, what: str) -> None:
    n = len(net.emb_l)
    with torch.no_grad():
        ref_prob = net(*dlrm_inputs(batch, n)).squeeze(1)
        ref_logit = net.logits(*dlrm_inputs(batch, n))
        ours = model(*batch.inputs())
    assert_close(ours, ref_logit, "float32", f"{what} logits")
    assert_close(torch.sigmoid(ours), ref_prob, "probability", f"{what} sigmoid(logits)")
    assert_close(model.predict(*batch.inputs()), ref_prob, "probability", f"{what} predict")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_dlrm(variant, tmp_path, make_batch):
    net, overrides, kinds = dlrm_net(variant)
    path = tmp_path / "model.pt"
    save_like_dlrm(net, path)
    model = rewrite.load(path, **overrides)
    assert [rep.kind for rep in model.embeddings.values()] == kinds
    assert list(model.embeddings) == [f"t{i}" for i in range(len(ROWS))]
    assert model.spec.features == tuple((f"f{i}", f"t{i}") for i in range(len(ROWS)))
    for k, batch in enumerate(batches(make_batch)):
        assert k == 2 or int(batch.indices.max()) == max(ROWS) - 1
        assert_matches_reference(model, net, batch, f"{variant} batch {k}")
        # each table on its own: localises a failure to one representation
        _, lS_o, lS_i = dlrm_inputs(batch, len(ROWS))
        for i, (rep, ref) in enumerate(zip(model.embeddings.values(), net.emb_l)):
            with torch.no_grad():
                offsets = torch.cat([lS_o[i], torch.tensor([lS_i[i].numel()])])
                assert_close(rep(lS_i[i], offsets), ref(lS_i[i], lS_o[i]),
                             REP_TOLERANCE[rep.kind], f"{variant} table {i}")


def test_interaction_spec(tmp_path):
    expected = {"plain-dot": ("dot", "dlrm"), "plain-dot-self": ("dot", "dlrm-self"),
                "plain-cat": ("cat", "dlrm")}
    for variant, (kind, pairs) in expected.items():
        net, _, _ = dlrm_net(variant)
        save_like_dlrm(net, tmp_path / f"{variant}.pt")
        spec = rewrite.load(tmp_path / f"{variant}.pt").spec
        assert (spec.interaction, spec.pairs) == (kind, pairs), variant
        assert spec.bottom == tuple(lin.out_features for lin in net.bot_l[::2])
        assert spec.top == tuple(lin.out_features for lin in net.top_l[::2])


def test_qr_parameters(tmp_path):
    net, overrides, _ = dlrm_net("qr-add")
    save_like_dlrm(net, tmp_path / "m.pt")
    model = rewrite.load(tmp_path / "m.pt", **overrides)
    t2, t3 = model.embeddings["t2"], model.embeddings["t3"]
    assert (t2.collisions, t2.op, t2.rows) == (7, "add", 7 * 43)   # ceil(300/7) = 43 quotient rows
    assert (t3.rows, t3.pool_first, t3.float_quotient) == (7 * 143, True, True)
    exact = rewrite.load(tmp_path / "m.pt", qr_op="add", qr_rows={2: 300, 3: 1000})
    assert (exact.embeddings["t2"].rows, exact.embeddings["t3"].rows) == (300, 1000)


def test_md_parameters(tmp_path):
    net, _, _ = dlrm_net("md")
    save_like_dlrm(net, tmp_path / "m.pt")
    assert "emb_l.2.proj.weight" not in net.state_dict()          # dim == base: nn.Identity
    model = rewrite.load(tmp_path / "m.pt")
    t1, t3 = model.embeddings["t1"], model.embeddings["t3"]
    assert (t1.rows, t1.inner_dim, t1.dim) == (17, 3, 8)
    assert (t3.rows, t3.inner_dim, t3.dim) == (1000, 2, 8)
    assert torch.equal(t3.proj, net.emb_l[3].proj.weight.detach())


def test_metadata_from_numpy_scalars(tmp_path):
    net, _, _ = dlrm_net("plain-dot")
    saved = save_like_dlrm(net, tmp_path / "m.pt", nbatches=321)
    meta = rewrite.load(tmp_path / "m.pt").spec.provenance["metadata"]
    assert meta["test_auc"] == pytest.approx(0.7712) and type(meta["test_auc"]) is float
    assert meta["test_acc"] == pytest.approx(0.7893)
    assert meta["iter"] == 321 and type(meta["iter"]) is int
    assert meta["train_loss"] == pytest.approx(float(saved["train_loss"]))
    assert (meta["nepochs"], meta["nbatches"], meta["nbatches_test"], meta["epoch"]) == (1, 321, 7, 0)
    json.dumps(meta)   # plain Python values only: goes straight into inspect --json


def test_numpy_1x_module_spelling(tmp_path):
    """Files written under numpy 1.x name ``numpy.core.multiarray.scalar``; both spellings load."""
    net, _, _ = dlrm_net("plain-dot")
    blob = {"state_dict": net.state_dict(), "test_auc": np.float64(0.75), "iter": np.int64(9)}
    torch.save(blob, tmp_path / "new.pt", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "new.pt").read_bytes()
    assert b"numpy._core.multiarray\nscalar" in raw
    (tmp_path / "old.pt").write_bytes(raw.replace(b"numpy._core.multiarray\nscalar",
                                                  b"numpy.core.multiarray\nscalar"))
    meta = rewrite.load(tmp_path / "old.pt").spec.provenance["metadata"]
    assert meta == {"test_auc": 0.75, "iter": 9}


@pytest.mark.parametrize("save", [save_bare_state_dict, save_data_parallel])
def test_other_layouts(save, tmp_path, make_batch):
    net, overrides, kinds = dlrm_net("qr-mult")
    save(net, tmp_path / "m.pt")
    model = rewrite.load(tmp_path / "m.pt", **overrides)
    assert [rep.kind for rep in model.embeddings.values()] == kinds
    assert_matches_reference(model, net, make_batch(batch=16, seed=5), save.__name__)


def test_ambiguous_interaction_needs_a_choice(tmp_path, make_batch):
    """d=2 with 3 tables: dot gives 2 + 6 = 8 inputs and cat gives 2 + 3*2 = 8."""
    rows = (5, 9, 30)
    nets = {op: DLRM_Net(2, list(rows), [N_DENSE, 4, 2], [8, 4, 1], arch_interaction_op=op)
            for op in ("dot", "cat")}
    for op, net in nets.items():
        save_like_dlrm(net, tmp_path / f"{op}.pt")
        with pytest.raises(RewriteError) as e:
            rewrite.load(tmp_path / f"{op}.pt")
        assert str(tmp_path / f"{op}.pt") in str(e.value)
        assert "fit both dot and cat" in str(e.value) and "--interaction" in str(e.value)
        model = rewrite.load(tmp_path / f"{op}.pt", interaction=op)
        assert model.spec.interaction == op
        assert_matches_reference(model, net, make_batch(rows, batch=16, seed=6), op)


def expect_error(path, *fragments, **overrides) -> str:
    with pytest.raises(RewriteError) as e:
        rewrite.load(path, **overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in (str(path), *fragments):
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_interaction_that_does_not_fit(tmp_path):
    net, _, _ = dlrm_net("plain-dot")
    save_like_dlrm(net, tmp_path / "m.pt")
    expect_error(tmp_path / "m.pt", "interaction dot-self gives 23 features but the first top "
                 "layer takes 18", interaction="dot-self")
    with pytest.raises(RewriteError, match="unknown interaction 'dcn'"):
        rewrite.load(tmp_path / "m.pt", interaction="dcn")
    with pytest.raises(RewriteError, match="unknown QR operation 'div'"):
        rewrite.load(tmp_path / "m.pt", qr_op="div")


def _edit(variant, edit):
    net, _, _ = dlrm_net(variant)
    state = net.state_dict()
    edit(state)
    return {"state_dict": state, "test_auc": np.float64(0.7)}


BAD_STATES = {
    "missing bias": ("plain-dot", lambda s: s.pop("bot_l.2.bias"),
                     ["key 'bot_l.2.bias' is missing or not a tensor"]),
    "missing weight_r": ("qr-mult", lambda s: s.pop("emb_l.3.weight_r"),
                         ["key 'emb_l.3.weight_r' is missing"]),
    "missing table": ("plain-dot", lambda s: s.pop("emb_l.1.weight"),
                      ["table 1 has none of emb_l.1.weight, .weight_q, .embs.weight"]),
    "no top mlp": ("plain-dot", lambda s: [s.pop(k) for k in list(s) if k.startswith("top_l")],
                   ["no top_l.*.weight keys"]),
    "1-D table": ("plain-dot", lambda s: s.update({"emb_l.0.weight": torch.zeros(8)}),
                  ["key 'emb_l.0.weight' should be a 2-D float tensor, got shape (8,)"]),
    "integer table": ("plain-dot", lambda s: s.update({"emb_l.0.weight": torch.zeros(2, 8, dtype=torch.int64)}),
                      ["key 'emb_l.0.weight' should be a 2-D float tensor", "torch.int64"]),
    "not a tensor": ("plain-dot", lambda s: s.update({"top_l.0.weight": [1.0, 2.0]}),
                     ["key 'top_l.0.weight' is missing or not a tensor"]),
    "layer widths": ("plain-dot", lambda s: s.update({"bot_l.2.weight": torch.zeros(8, 15)}),
                     ["bot_l.2.weight expects 15 inputs but the previous layer gives 16"]),
    "bias size": ("plain-dot", lambda s: s.update({"top_l.2.bias": torch.zeros(3)}),
                  ["top_l.2.bias has 3 entries, weight has 8 rows"]),
    "two outputs": ("plain-dot", lambda s: s.update({"top_l.4.weight": torch.zeros(2, 8),
                                                     "top_l.4.bias": torch.zeros(2)}),
                    ["the last top layer has 2 outputs, expected 1"]),
    "table width": ("plain-dot", lambda s: s.update({"emb_l.1.weight": torch.zeros(17, 5)}),
                    ["dot interaction needs every table of width 8", "[5, 8]"]),
    "top width": ("plain-dot", lambda s: s.update({"top_l.0.weight": torch.zeros(16, 19)}),
                  ["the first top layer takes 19 inputs; dot would give 18"]),
    "qr widths": ("qr-mult", lambda s: s.update({"emb_l.2.weight_r": torch.zeros(4, 6)}),
                  ["table 2: weight_q and weight_r widths differ"]),
    "md proj": ("md", lambda s: s.update({"emb_l.3.proj.weight": torch.zeros(8, 5)}),
                ["table 3: proj.weight is (8, 5), embs.weight has width 2"]),
    "learned pooling": ("plain-dot", lambda s: s.update({"v_W_l.2": torch.ones(300)}),
                        ["table 2 uses learned pooling weights (v_W_l.2", "not support"]),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_malformed_state_dict(case, tmp_path):
    variant, edit, fragments = BAD_STATES[case]
    torch.save(_edit(variant, edit), tmp_path / "bad.pt")
    expect_error(tmp_path / "bad.pt", *fragments)


def test_learned_pooling_checkpoint_refused(tmp_path):
    """A real --weighted-pooling=learned model: its v_W_l.{i} keys name the first table."""
    net = DLRM_Net(8, list(ROWS), [N_DENSE, 16, 8], [18, 1], weighted_pooling="learned")
    assert "v_W_l.0" in net.state_dict()
    save_like_dlrm(net, tmp_path / "m.pt")
    expect_error(tmp_path / "m.pt", "table 0 uses learned pooling weights (v_W_l.0",
                 "--weighted-pooling=learned")


def test_inconsistent_qr_rows(tmp_path):
    net, _, _ = dlrm_net("qr-mult")
    save_like_dlrm(net, tmp_path / "m.pt")
    expect_error(tmp_path / "m.pt", "table 2: 100 rows with 4 collisions need 25 quotient rows, "
                 "the file has 75", qr_rows={2: 100})


def test_not_a_dlrm_state_dict(tmp_path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pt")
    expect_error(tmp_path / "linear.pt", "not a recognised DLRM checkpoint", "weight, bias")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "epoch": 3}, tmp_path / "ckpt.pt")
    expect_error(tmp_path / "ckpt.pt", "not a recognised DLRM checkpoint", "encoder.weight")
    torch.save({0: torch.zeros(2)}, tmp_path / "intkeys.pt")
    expect_error(tmp_path / "intkeys.pt", "not a state dict")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    expect_error(tmp_path / "list.pt", "expected a dict", "found list")
    torch.save({"bot_l.0.weight": torch.zeros(4, 3), "bot_l.0.bias": torch.zeros(4)}, tmp_path / "mlp.pt")
    expect_error(tmp_path / "mlp.pt", "no emb_l.* keys")


def test_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.pt", "no such file")
    expect_error(tmp_path, "is a directory")
