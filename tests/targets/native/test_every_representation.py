"""The fused engine (``torch-fast``, ``torch-fast-int8``) takes every representation.

Each table's bags from the fused kernels equal its eager ``forward`` (the reference) on ragged
batches with empty bags and every table's largest id, at every ISA tier this host runs; a model
whose tables are each a different representation (``tests.representations``) matches eager end
to end on both fused targets, tiny batches (one C++ call) and large ones.
"""

import pytest
import torch

from passes.hashing import HashBag
from passes.quotient_remainder import QRBag
from rewrite.core.model import split_bags
from targets.base import get_target
from targets.native.engine import FusedTables
from targets.native.fast_kernels import kernels, store_tables
from tests.representations import REPRESENTATIONS, composite_model
from tests.targets import checks
from tests.targets.checks import assert_matches_eager, lower_and_load
from tests.tolerances import assert_close

torch.set_num_threads(1)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isa_tier")]

# How the engine runs each representation: inside the C++ gather (its kind), or "pre": pooled by
# its own forward (compute forms; bf16 tables; dlrm's float32 QR quotient).
KIND = {"table-fp32": "rows", "table-fp16": "rows", "table-bf16": "pre", "table-mean": "rows", "qr-mult": "qr",
        "qr-concat-pool-first": "qr", "qr-add-float-quotient": "pre", "md": "rows", "int8-rowwise": "rows",
        "int4-rowwise": "rows", "int2-rowwise": "rows", "hash": "hash", "onehot": "rows", "tt": "tt",
        "tt-cache-int8": "tt", "prune-dims": "pruned", "hot-cold-int4": "hotcold", "dhe": "pre", "hybrid": "pre",
        "memrec": "pre", "robe": "pre", "mdq-int4": "rows", "mdq-int8-full": "rows",
        "mdq-int2-shared-bytes": "rows"}


def NO_PRE(indices, offsets):          # noqa: N802 -- stores without pre-pooled features
    return torch.empty(0)


@pytest.fixture(scope="module")
def mixed():
    return composite_model()


def pooled_per_feature(store, pre_of, indices, offsets) -> torch.Tensor:
    w, feat, d = store.args()
    return kernels().gather_bags(w, indices, offsets, feat, d, pre_of(indices, offsets)).transpose(0, 1)


@torch.inference_mode()
def test_every_representation_pools_like_its_eager_forward(mixed):
    assert sorted(KIND) == sorted(name for name, _ in REPRESENTATIONS)
    tables = FusedTables(mixed)
    assert tables.kinds[:len(KIND)] == [KIND[name] for name, _ in REPRESENTATIONS]
    n = len(mixed.spec.features)
    for batch in checks.test_batches(mixed):
        got = pooled_per_feature(tables.store, tables.pre, batch.indices, batch.offsets)
        bags = split_bags(batch.indices, batch.offsets, n)
        for f, name in enumerate(mixed.feature_tables):
            ref = mixed.embeddings[name](bags[2 * f], bags[2 * f + 1])
            assert_close(got[f], ref, "fused-lookup", f"{name} ({tables.kinds[f]}) B={batch.size}")


@pytest.mark.parametrize("name", ["torch-fast", "torch-fast-int8"])
def test_a_model_mixing_every_representation_matches_eager(mixed, tmp_path, name):
    from rewrite.core.errors import RewriteError
    from targets.native.int8_kernels import int8_mlp_wrong

    target = get_target(name)
    if name == "torch-fast-int8" and int8_mlp_wrong():   # the generic tier in a process capped at avx2
        assert target.unavailable() == int8_mlp_wrong()
        with pytest.raises(RewriteError, match="torch-fast-int8 cannot run this model here: the bottom MLP: its int8"):
            lower_and_load(target, mixed, tmp_path)
        return
    _, runner = lower_and_load(target, mixed, tmp_path)
    assert assert_matches_eager(runner, mixed, target.precision) > 0


@torch.inference_mode()
def test_hash_and_qr_index_transforms_hold_past_2_to_the_31():
    """Ids of a 3e9-row table: the hash's (a (i mod p) + b) mod p and QR's i // c, i mod c in the
    kernel's integers equal torch's int64 ones."""
    g = torch.Generator().manual_seed(0)
    rows = 3_000_000_000
    hashed = HashBag(rows, 16, 1000, a=2_000_000_011, b=1_234_567)
    qr = QRBag(rows, 16, 100_003, op="add")
    for t in (hashed, qr):
        for p in t.parameters():
            p.data = torch.randn(p.shape, generator=g)
    ids = torch.tensor([0, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 5, rows - 1, 7, 2**31 + 12_345], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 3, 8, 8, 11, 16], dtype=torch.int64)     # 2 features x 3 bags, one empty each
    store = store_tables([hashed, qr], [0, 1], 16)
    got = pooled_per_feature(store, NO_PRE, torch.cat([ids, ids]), offsets)
    for f, t in enumerate((hashed, qr)):
        assert_close(got[f], t(ids, offsets[:4] if f == 0 else offsets[3:] - 8), "fused-lookup", t.describe())


@torch.inference_mode()
def test_a_remap_entry_outside_the_tables_parts_is_an_error_not_a_read(mixed):
    for name in ("t15_prune-dims", "t16_hot-cold-int4"):
        rep = mixed.embeddings[name]
        good = store_tables([rep], [0], rep.dim)
        ids = torch.tensor([0, 1, rep.rows - 1], dtype=torch.int64)
        offsets = torch.tensor([0, 3], dtype=torch.int64)
        pooled_per_feature(good, NO_PRE, ids, offsets)
        saved = rep.remap[1].clone()
        rep.remap[1] = torch.iinfo(rep.remap.dtype).min          # before every part of the table
        try:
            bad = store_tables([rep], [0], rep.dim)
        finally:
            rep.remap[1] = saved
        with pytest.raises(RuntimeError, match="remap entry outside the table's parts"):
            pooled_per_feature(bad, NO_PRE, ids, offsets)
