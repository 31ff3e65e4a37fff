"""``ShardedTensor`` values in ``torch.save`` files, read without a process group.

DistributedModelParallel's ``state_dict()`` holds each sharded table as a
``torch.distributed._shard.sharded_tensor.ShardedTensor``; ``torch.save`` pickles it as its
local shards plus metadata, and unpickling the real class needs a live process group of the
same world size.  We unpickle with PyTorch's weights-only unpickler and map the ShardedTensor
family's global names to inert stand-ins defined here (``torch.serialization.safe_globals``
accepts ``(object, "module.Name")`` pairs), so nothing from the file runs and no process group
is needed.  Each stand-in is then replaced by one dense tensor:

    W[o_0 : o_0 + s_0, o_1 : o_1 + s_1] = shard.tensor     for every local shard (offsets o, sizes s)

which needs the file's local shards to cover the whole tensor (a world-size-1 save, or a rank
that held every shard of that table).  Otherwise the key is refused with the way out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewrite.core.errors import RewriteError

_ST = "torch.distributed._shard.sharded_tensor"
WAY_OUT = ("save the model with torch.distributed.checkpoint (dcp.save(model.state_dict(), "
           "checkpoint_id=DIR)) and load DIR, or gather every table to one rank as a plain "
           "tensor before torch.save")


class _Record:
    """Inert attribute bag standing in for Shard, ShardMetadata, _remote_device, ..."""


class _Properties:
    """Stands in for TensorProperties (pickled as a 5-tuple state)."""

    def __setstate__(self, state):
        self.state = state


class ShardedStandIn(torch.Tensor):
    """Stands in for ShardedTensor: a storage-less wrapper holding the pickled state."""

    def __setstate__(self, state):
        self.standin_state = state  # (local_shards, metadata, pg_state, spec, init_rrefs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("a ShardedTensor stand-in holds no data; resolve() it first")


def _enum_value(value: Any) -> Any:
    return value


def _nested_class(owner: Any, name: str) -> Any:
    """``getattr`` as the pickle uses it (ShardedTensor.ProcessGroupState), and nothing else."""
    if owner is ShardedStandIn and name == "ProcessGroupState":
        return _Record
    raise RewriteError(f"refusing getattr({owner!r}, {name!r}) in a pickle")


def standins() -> list[tuple[Any, str]]:
    """safe_globals entries mapping the ShardedTensor family's names to the stand-ins."""
    records = [f"{_ST}.shard.Shard", "torch.distributed._shard.metadata.ShardMetadata",
               "torch.distributed.remote_device._remote_device", f"{_ST}.metadata.ShardedTensorMetadata",
               "torch.distributed._shard.sharding_spec.api.EnumerableShardingSpec",
               "torch.distributed._shard.sharding_spec.chunk_sharding_spec.ChunkShardingSpec"]
    return [(ShardedStandIn, f"{_ST}.api.ShardedTensor"),
            (_Properties, f"{_ST}.metadata.TensorProperties"),
            (_enum_value, f"{_ST}.metadata.MEM_FORMAT_ENCODING"),
            (_nested_class, "__builtin__.getattr"), (_nested_class, "builtins.getattr"),
            *[(_Record, name) for name in records]]


def resolve(obj: Any, path: Path, key: str = "") -> Any:
    """Replace every ShardedTensor stand-in inside dicts/lists/tuples by its dense tensor."""
    if isinstance(obj, ShardedStandIn):
        return _assemble(obj, path, key)
    if isinstance(obj, dict):
        return type(obj)((k, resolve(v, path, f"{key}.{k}" if key else str(k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(v, path, f"{key}[{i}]") for i, v in enumerate(obj))
    return obj


def _assemble(st: ShardedStandIn, path: Path, key: str) -> torch.Tensor:
    try:
        local_shards, metadata = st.standin_state[0], st.standin_state[1]
        size = [int(s) for s in metadata.size]
        total = [list(m.shard_sizes) for m in metadata.shards_metadata]
        parts = [(list(s.metadata.shard_offsets), s.tensor) for s in local_shards]
    except (AttributeError, IndexError, TypeError) as e:
        raise RewriteError(f"{path}: key {key!r} is a ShardedTensor in a layout this reader does "
                           f"not know ({e}); {WAY_OUT}") from None
    dtype = parts[0][1].dtype if parts else torch.float32
    out = torch.empty(size, dtype=dtype)
    held = 0
    for offsets, t in parts:
        window = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
        if len(offsets) != len(size) or any(o + n > s for o, n, s in zip(offsets, t.shape, size)):
            raise RewriteError(f"{path}: key {key!r}: a shard at {offsets} of shape {tuple(t.shape)} "
                               f"lies outside the tensor's size {size}")
        out[window] = t
        held += t.numel()
    if held != out.numel():  # ShardedTensor's shards never overlap, so counting suffices
        raise RewriteError(f"{path}: key {key!r} is a ShardedTensor of size {size} in {len(total)} "
                           f"shards; this file holds {len(parts)} of them ({held} of {out.numel()} "
                           f"elements), the rest were saved by other ranks: {WAY_OUT}")
    return out
