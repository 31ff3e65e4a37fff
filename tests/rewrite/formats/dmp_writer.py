"""Writes DistributedModelParallel-style checkpoints with real torch.distributed APIs (gloo, CPU).

Run as ``python -m tests.rewrite.formats.dmp_writer OUT WORLD``: WORLD processes build the same
reference DLRM (same seed) and hold its tables as ``ShardedTensor``s the way TorchRec shards
them: table-wise (table i on rank i % WORLD) except ``t_cat_0``, which is row-wise split
across all ranks.  Dense parameters are plain replicated tensors, as DDP holds them.  Every
rank then calls ``torch.distributed.checkpoint.save`` into OUT/dcp (one .distcp file per rank,
key order in .metadata by rank) and ``torch.save``s its own state dict to OUT/rank{r}.pt.
The reference model itself is saved as OUT/reference.pt (a plain state dict).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

from tests.rewrite.formats.torchrec_ref import DLRMTrain, RefDLRM

N_TABLES = 12  # > 10, so t_cat_10 sorts after t_cat_9 only when numbers compare as numbers
TABLE_KEY = "model.sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


def reference() -> RefDLRM:
    tables = {f"t_cat_{i}": 7 + 3 * i for i in range(N_TABLES)}
    return RefDLRM(tables, dim=4, n_dense=13, dense_sizes=[8, 4], over_sizes=[8, 1], seed=11).eval()


def sharded_state(rank: int, world: int) -> dict:
    ref = reference()
    state = {}
    for k, v in DLRMTrain(ref).state_dict().items():
        if ".embedding_bags." not in k:
            state[k] = v
    bags = ref.sparse_arch.embedding_bag_collection.embedding_bags
    for i, (name, bag) in enumerate(bags.items()):
        w = bag.weight.detach()
        if i == 0:  # row-wise over all ranks
            bounds = [w.shape[0] * r // world for r in range(world + 1)]
            lo, hi = bounds[rank], bounds[rank + 1]
            shards = [Shard(w[lo:hi].clone(), ShardMetadata([lo, 0], [hi - lo, w.shape[1]], f"rank:{rank}/cpu"))]
        elif i % world == rank:  # table-wise
            shards = [Shard(w.clone(), ShardMetadata([0, 0], list(w.shape), f"rank:{rank}/cpu"))]
        else:
            shards = []
        state[TABLE_KEY.format(name)] = init_from_local_shards(shards, list(w.shape))
    return state


def worker(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():  # ShardedTensor's deprecation notice
            warnings.simplefilter("ignore")
            state = sharded_state(rank, world)
            dcp.save(state, checkpoint_id=os.path.join(out, "dcp"))
            torch.save(state, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(out: str, world: int) -> None:
    torch.set_num_threads(1)
    torch.save(reference().state_dict(), os.path.join(out, "reference.pt"))
    if world == 1:
        worker(0, 1, out)
    else:
        mp.start_processes(worker, args=(world, out), nprocs=world, start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
