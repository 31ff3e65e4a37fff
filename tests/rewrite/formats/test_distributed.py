"""DistributedModelParallel checkpoints: ShardedTensor torch.save files and DCP directories,
written with real torch.distributed APIs (gloo on CPU) and read with no process group."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner

import rewrite
from rewrite.cli import main
from tests.rewrite.formats import dmp_writer
from tests.rewrite.formats.test_torchrec import assert_same, rows_of
from tests.rewrite.formats.torchrec_ref import DLRMTrain, RefDLRM

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[3]
TABLES = [f"t_cat_{i}" for i in range(dmp_writer.N_TABLES)]


@pytest.fixture(scope="module")
def world1(tmp_path_factory) -> Path:
    """One rank holding every shard (t_cat_0 in one row-wise shard), written in this process."""
    out = tmp_path_factory.mktemp("world1")
    dmp_writer.main(str(out), 1)
    assert not dist.is_initialized()
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> Path:
    """Two spawned ranks: tables split table-wise, t_cat_0 row-wise across both."""
    out = tmp_path_factory.mktemp("world2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tests.rewrite.formats.dmp_writer", str(out), "2"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=300)
    return out


def test_sharded_torch_save_loads_without_process_group(world1):
    assert not dist.is_initialized()
    model = rewrite.load(world1 / "rank0.pt")
    ref = dmp_writer.reference()
    assert list(model.embeddings) == TABLES
    assert_same(ref, model, rows_of(ref))


def test_sharded_tensor_with_several_local_shards(tmp_path):
    """A rank holding two row-wise shards of one table (world size 1)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    ref = RefDLRM({"t_a": 10, "t_b": 4}, 4, 13, [4], [4, 1], seed=2).eval()
    sd = ref.state_dict()
    w = sd["sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd["sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"] = init_from_local_shards(
                [Shard(w[:3].clone(), ShardMetadata([0, 0], [3, 4], "rank:0/cpu")),
                 Shard(w[3:].clone(), ShardMetadata([3, 0], [7, 4], "rank:0/cpu"))], [10, 4])
            torch.save(sd, tmp_path / "m.pt")
    finally:
        dist.destroy_process_group()
    assert_same(ref, rewrite.load(tmp_path / "m.pt"), [10, 4])


@pytest.mark.slow
def test_dcp_from_two_ranks_reassembles_the_model(world2):
    files = sorted(p.name for p in (world2 / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model = rewrite.load(world2 / "dcp")
    assert list(model.embeddings) == TABLES  # metadata order is by rank; tables sorted by name
    assert model.spec.provenance["container"] == "torch.distributed.checkpoint"
    ref = dmp_writer.reference()
    assert_same(ref, model, rows_of(ref))


@pytest.mark.slow
def test_one_ranks_torch_save_is_refused_with_the_way_out(world2):
    with pytest.raises(rewrite.RewriteError) as e:
        rewrite.load(world2 / "rank1.pt")
    msg = str(e.value)
    assert "key 'model.sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight' is a " \
           "ShardedTensor of size [7, 4] in 2 shards; this file holds 1 of them (16 of 28 elements)" in msg
    assert "torch.distributed.checkpoint" in msg and "\n" not in msg


def test_dcp_without_process_group_skips_non_tensor_entries(tmp_path):
    """dcp.save in a single process: nested {"model", "optim", "step"}; only tensors are read."""
    ref = RefDLRM({f"t_cat_{i}": 5 + i for i in range(11)}, 4, 13, [4], [4, 1], seed=4).eval()
    sd = {"model": DLRMTrain(ref).state_dict(), "optim": {"lr": torch.tensor(0.1)}, "step": 7,
          "evil": _Payload(tmp_path / "ran")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=tmp_path / "ck")
    model = rewrite.load(tmp_path / "ck")
    assert not (tmp_path / "ran").exists()  # the pickled non-tensor entry was never unpickled
    assert model.spec.provenance["skipped_non_tensor_keys"] == ["step", "evil"]
    assert model.spec.provenance["ignored_keys"] == 1  # optim.lr
    assert list(model.embeddings) == [f"t_cat_{i}" for i in range(11)]
    assert_same(ref, model, rows_of(ref))
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "ck"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["provenance"]["container"] == "torch.distributed.checkpoint"


class _Payload:
    """Unpickling this runs code: a reader that unpickles it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_metadata_naming_code_is_refused(tmp_path):
    ck = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2)}, checkpoint_id=ck)
    (ck / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "ran")))
    with pytest.raises(rewrite.RewriteError, match=r"\.metadata: names posix\.system, which a DCP "
                                                   r"metadata file does not need; refusing"):
        rewrite.load(ck)
    assert not (tmp_path / "ran").exists()


def test_broken_dcp_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(rewrite.RewriteError, match=r"a directory without a \.metadata file"):
        rewrite.load(tmp_path / "empty")
    ck = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": DLRMTrain(RefDLRM({"t_a": 5}, 4, 13, [4], [4, 1])).state_dict()},
                 checkpoint_id=ck)
    data = ck / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(rewrite.RewriteError, match=r"could not read the DCP checkpoint's data files"):
        rewrite.load(ck)
    (ck / ".metadata").write_bytes(b"\x80\x04junk")
    with pytest.raises(rewrite.RewriteError, match=r"not a readable DCP metadata file"):
        rewrite.load(ck)
