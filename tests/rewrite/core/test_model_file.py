"""The native file's streaming writer and lazy reader: the writer's bytes equal safetensors'
own ``save_file`` for every dtype it stores and for rewritten models; the reader maps the file
and reads no table bytes until a table is used."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import rewrite
from passes.quantized import RowwiseQuantizedBag
from rewrite.core import mapped, model_file
from rewrite.core.embedding import TableBag
from tests.rewrite.core.test_mapped import resident_bytes


def test_header_and_bytes_equal_safetensors_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k, dtype in enumerate(model_file.DTYPES):
        t = torch.randint(0, 2 if dtype == torch.bool else 100, (3, 5 + k), generator=g)
        tensors[f"{'zyx'[k % 3]}{k}"] = t.to(torch.float32).to(dtype) if dtype.is_floating_point else t.to(dtype)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["view"] = torch.arange(24.0).reshape(4, 6)[:, ::2]            # non-contiguous
    meta = {"k": 'quote " backslash \\ newline \n é \x01'}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    model_file.write_tensors(tensors, meta, ours)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata=meta)
    assert ours.read_bytes() == theirs.read_bytes()


def test_save_equals_save_file_for_a_rewritten_model(small_dlrm, tmp_path):
    rows = small_dlrm.embeddings["t2"].rows
    q4, _ = RowwiseQuantizedBag.from_table(small_dlrm.embeddings["t2"].weight, 4)
    model = small_dlrm.with_tables({"t2": q4, "t1": TableBag(small_dlrm.embeddings["t1"].rows, 4, dtype="float16",
                                                            weight=small_dlrm.embeddings["t1"].weight)})
    assert model.embeddings["t2"].rows == rows
    path, ref = tmp_path / "m.safetensors", tmp_path / "ref.safetensors"
    rewrite.save(model, path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ref),
                                metadata={model_file.META_KEY: json.dumps(model.full_spec(), sort_keys=True)})
    assert path.read_bytes() == ref.read_bytes()


def test_write_in_blocks_is_the_same_file(small_dlrm, tmp_path, monkeypatch):
    whole = tmp_path / "whole.safetensors"
    rewrite.save(small_dlrm, whole)
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (7,))   # every tensor in many odd-sized blocks
    blocks = tmp_path / "blocks.safetensors"
    rewrite.save(small_dlrm, blocks)
    assert blocks.read_bytes() == whole.read_bytes()


def test_load_maps_the_file_and_reads_tables_only_when_used(make_dlrm, tmp_path, make_batch):
    rows = (3, 200_000, 50)                                # t1: 200k x 16 fp32 = 12.8 MB
    path = tmp_path / "big.safetensors"
    rewrite.save(make_dlrm(rows=rows, dim=16), path)
    model = rewrite.load(path)
    w = model.embeddings["t1"].weight.detach()
    assert resident_bytes(path) < (1 << 20), "loading touched table pages"
    assert model_file.read_spec(path)["tables"][1]["rows"] == 200_000
    assert float(w.sum()) == pytest.approx(float(make_dlrm(rows=rows, dim=16).embeddings["t1"].weight.detach().sum()), rel=1e-5)
    assert resident_bytes(path) > 10e6                    # summing read the table...
    mapped.release(w)
    assert resident_bytes(path) < (1 << 20)               # ...and release handed its pages back
    batch = make_batch(rows=rows)
    assert torch.equal(model(*batch.inputs()), make_dlrm(rows=rows, dim=16)(*batch.inputs()))
