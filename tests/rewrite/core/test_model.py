"""The canonical model: interaction pair orders, and forward == a direct per-bag Python computation
(loops over samples, bags and ids; no shared code with the model) for every interaction."""

from __future__ import annotations

import pytest
import torch

from rewrite.core.embedding import TableBag
from rewrite.core.model import ModelSpec, RecModel, interaction_pairs, interaction_width, split_bags
from tests.conftest import N_DENSE, ROWS
from tests.tolerances import assert_close


def test_pair_orders_by_hand():
    assert interaction_pairs(3, "dlrm") == [(1, 0), (2, 0), (2, 1)]
    assert interaction_pairs(3, "dlrm-self") == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert interaction_pairs(3, "torchrec") == [(0, 1), (0, 2), (1, 2)]
    assert len(interaction_pairs(27, "dlrm")) == 351          # Criteo: 26 tables + x
    with pytest.raises(ValueError, match="unknown interaction pair order 'upper'"):
        interaction_pairs(3, "upper")


def build(interaction="dot", pairs="dlrm", features=None, dim=4, seed=0) -> RecModel:
    features = features or tuple((f"f{i}", f"t{i}") for i in range(len(ROWS)))
    g = torch.Generator().manual_seed(seed)
    names = sorted({t for _, t in features})
    tables = {t: TableBag(ROWS[int(t[1:])], dim, weight=torch.randn(ROWS[int(t[1:])], dim, generator=g) * 0.5)
              for t in names}
    spec = ModelSpec(n_dense=N_DENSE, bottom=(8, dim), top=(6, 1), features=features,
                     interaction=interaction, pairs=pairs)
    torch.manual_seed(seed)
    return RecModel(spec, tables).eval()


def direct_logits(model: RecModel, batch) -> list[float]:
    """The model's math written out sample by sample, bag by bag, id by id."""
    spec = model.spec
    lin = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]   # noqa: E731
    bottom, top = lin(model.bottom), lin(model.top)
    n_f, b_size = len(spec.features), batch.size
    out = []
    for b in range(b_size):
        x = batch.dense[b]
        for layer in bottom:                        # ReLU after every bottom layer
            x = torch.relu(layer.weight @ x + layer.bias)
        embs = []
        for f, (_, t) in enumerate(spec.features):
            lo, hi = int(batch.offsets[f * b_size + b]), int(batch.offsets[f * b_size + b + 1])
            e = torch.zeros(model.embeddings[t].dim)
            for p in range(lo, hi):
                e = e + model.embeddings[t].weight[int(batch.indices[p])]
            embs.append(e)
        if spec.interaction == "dot":
            vecs = [x, *embs]
            z = [x] + [torch.dot(vecs[i], vecs[j]).reshape(1)
                       for i, j in interaction_pairs(n_f + 1, spec.pairs)]
        else:
            z = [x, *embs]
        h = torch.cat(z)
        for k, layer in enumerate(top):             # ReLU between top layers, none after the last
            h = layer.weight @ h + layer.bias
            if k < len(top) - 1:
                h = torch.relu(h)
        out.append(float(h[0]))
    return out


CASES = {"dot": ("dot", "dlrm"), "dot-self": ("dot", "dlrm-self"), "torchrec": ("dot", "torchrec"),
         "cat": ("cat", "dlrm")}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_direct_computation(case, make_batch):
    model = build(*CASES[case])
    for seed in (0, 1):
        batch = make_batch(batch=12, mean_len=2.5, seed=seed, empty_fraction=0.25)
        with torch.no_grad():
            got = model(*batch.inputs())
            expected = torch.tensor(direct_logits(model, batch))
        assert got.shape == (12,)
        assert_close(got, expected, "float32", case)
        assert_close(model.predict(*batch.inputs()), torch.sigmoid(expected), "probability", case)


def test_shared_table_between_features(make_batch):
    """TorchRec may feed several features from one table: the feature->table map decides."""
    features = (("a", "t0"), ("b", "t2"), ("c", "t2"), ("d", "t3"))
    model = build(features=features)
    assert list(model.embeddings) == ["t0", "t2", "t3"]
    rows = [ROWS[0], ROWS[2], ROWS[2], ROWS[3]]
    batch = make_batch(rows=rows, batch=10, seed=3)
    with torch.no_grad():
        assert_close(model(*batch.inputs()), torch.tensor(direct_logits(model, batch)), "float32", "shared")


def test_forward_bags_and_split(small_dlrm, ragged_batch):
    bags = split_bags(ragged_batch.indices, ragged_batch.offsets, len(ROWS))
    b = ragged_batch.size
    for f in range(len(ROWS)):
        idx, off = bags[2 * f], bags[2 * f + 1]
        assert off[0] == 0 and off.numel() == b + 1 and off[-1] == idx.numel()
        lo = int(ragged_batch.offsets[f * b])
        assert torch.equal(off, ragged_batch.offsets[f * b:(f + 1) * b + 1] - lo)
    with torch.no_grad():
        assert torch.equal(small_dlrm.forward_bags(ragged_batch.dense, list(bags)),
                           small_dlrm(*ragged_batch.inputs()))


def test_structure_and_sizes(small_dlrm):
    spec = small_dlrm.spec
    assert isinstance(small_dlrm.bottom[-1], torch.nn.ReLU)          # dlrm: ReLU after the last bottom layer
    assert isinstance(small_dlrm.top[-1], torch.nn.Linear)           # logits: nothing after the last top layer
    assert interaction_width(spec, [8] * 4) == 8 + 10
    assert small_dlrm.top[0].in_features == 18
    assert small_dlrm.embedding_bytes() == sum(ROWS) * 8 * 4
    widths = [N_DENSE, 16, 8], [18, 16, 8, 1]
    dense = sum((a + 1) * b for w in widths for a, b in zip(w[:-1], w[1:])) * 4
    assert small_dlrm.dense_bytes() == dense
    assert ModelSpec.from_json(spec.to_json()) == spec
    full = small_dlrm.full_spec()
    assert full["version"] == 1 and [t["name"] for t in full["tables"]] == ["t0", "t1", "t2", "t3"]


def test_with_tables_shares_mlps(small_dlrm):
    new_t1 = TableBag(17, 8, weight=torch.ones(17, 8))
    other = small_dlrm.with_tables({"t1": new_t1})
    assert other.bottom is small_dlrm.bottom and other.top is small_dlrm.top
    assert other.embeddings["t1"] is new_t1 and other.embeddings["t0"] is small_dlrm.embeddings["t0"]
    assert small_dlrm.embeddings["t1"] is not new_t1 and not other.training


def test_empty_batch_gives_empty_logits(small_dlrm):
    f = len(small_dlrm.spec.features)
    out = small_dlrm(torch.zeros(0, N_DENSE), torch.zeros(0, dtype=torch.int64),
                     torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0,)
    assert len(split_bags(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), f)) == 2 * f


@pytest.mark.parametrize("field, value, message", [
    ("interaction", "attention", "unknown interaction 'attention'"),
    ("pairs", "upper", "unknown interaction pair order 'upper'"),
])
def test_spec_rejects_unknown_interaction(field, value, message):
    kwargs = dict(n_dense=N_DENSE, bottom=(8, 4), top=(1,), features=(("f0", "t0"),))
    with pytest.raises(ValueError, match=message):
        ModelSpec(**{**kwargs, field: value})
