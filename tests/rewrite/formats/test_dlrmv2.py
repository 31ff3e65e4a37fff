"""MLPerf DLRMv2's shape at a small scale: a DLRM_DCN with 26 tables of dim 128 and multi-hot bags,
written by two gloo ranks as a torch.distributed.checkpoint directory
(``benchmarks/dlrmv2_checkpoint.py``), inspected (metadata only), rewritten with
``-p quantize:bits=4`` and compiled to torch-fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rewrite
from benchmarks import dlrmv2_checkpoint as v2
from rewrite.cli import main
from rewrite.core import mapped
from rewrite.core.batch import Batch
from rewrite.runtime import load as load_bundle
from tests.rewrite.core.test_mapped import resident_bytes
from tests.tolerances import path_tolerance

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[3]
BIG = 80_000          # rows of t_cat_0 (41 MB): large enough to see whether loading read it
SMALL = dict(bottom=(32, v2.DIM), top=(32, 1), layers=2, rank=16)


def rows() -> tuple[int, ...]:
    return (BIG, *(min(r, 60) for r in v2.DLRMV2_ROWS[1:]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dlrmv2") / "dcp"
    code = (f"from benchmarks import dlrmv2_checkpoint as v2; "
            f"v2.write({str(out)!r}, {rows()!r}, 2, bottom={SMALL['bottom']!r}, top={SMALL['top']!r}, "
            f"layers={SMALL['layers']}, rank={SMALL['rank']})")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return out


def multi_hot(model, batch: int, seed: int) -> Batch:
    """DLRMv2's fixed bag sizes per feature (MULTI_HOT), some bags empty, each table's largest id."""
    g = torch.Generator().manual_seed(seed)
    rows_ = [model.embeddings[t].rows for t in model.feature_tables]
    lengths = torch.tensor([[0 if (b + f) % 7 == 0 else v2.MULTI_HOT[f] for b in range(batch)]
                            for f in range(len(rows_))])
    ids = [torch.randint(0, r, (int(n),), generator=g) for r, n in zip(rows_, lengths.sum(1))]
    for f, r in enumerate(rows_):
        if ids[f].numel():
            ids[f][-1] = r - 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.flatten().cumsum(0)])
    return Batch(torch.rand(batch, v2.N_DENSE, generator=g), torch.cat(ids), offsets)


def test_two_ranks_write_a_dcp_that_loads_as_dlrm_dcn(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model = rewrite.load(ckpt)
    spec = model.spec
    assert (spec.interaction, spec.cross_layers, spec.cross_rank, spec.pairs) == ("dcn", 2, 16, "torchrec")
    assert list(model.embeddings) == [f"t_cat_{i}" for i in range(26)]
    assert {rep.dim for rep in model.embeddings.values()} == {128}
    for i, (name, rep) in enumerate(model.embeddings.items()):     # every value, whichever rank wrote it
        assert torch.equal(rep.weight.detach(), v2.table(0, i, rows()[i], v2.DIM)), name
    dense = v2.dense_state(26, **SMALL)
    assert torch.equal(model.interaction.W[1], dense["model.inter_arch.crossnet.W_kernels.1"])


def test_tables_are_mapped_and_loading_reads_none(ckpt):
    model = rewrite.load(ckpt)
    big = model.embeddings["t_cat_0"].weight.detach()
    assert mapped.is_mapped(big), "t_cat_0 was copied"
    holder = next(p for p in ckpt.glob("__*_0.distcp") if p.stat().st_size > BIG * v2.DIM * 4)
    mapped.release(big)
    model = rewrite.load(ckpt)
    assert resident_bytes(holder) < BIG * v2.DIM * 4 // 4, "loading read the table's bytes"


def test_inspect_reports_the_shape(ckpt):
    res = CliRunner().invoke(main, ["inspect", str(ckpt), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["format"] == "torchrec" and info["interaction"] == "dcn"
    assert info["provenance"]["model"] == "DLRM_DCN"
    assert [t["dim"] for t in info["tables"]] == [128] * 26
    assert info["tables"][0]["rows"] == BIG and info["embedding_bytes"] == sum(rows()) * 128 * 4


def test_apply_quantize_4_and_compile_torch_fast(ckpt, tmp_path):
    q4, bundle = tmp_path / "q4.safetensors", tmp_path / "bundle"
    res = CliRunner().invoke(main, ["apply", str(ckpt), "-p", "quantize:bits=4", "-o", str(q4), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["written"] and report["tables_rewritten"] == 26
    res = CliRunner().invoke(main, ["compile", str(q4), "--target", "torch-fast", "-o", str(bundle), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["paths"]["torch-fast"]["verification"]["passed"]
    model, pred = rewrite.load(q4), load_bundle(bundle)
    held = json.loads((bundle / "manifest.json").read_text())["paths"]["torch-fast"]["representations"]
    assert all(r.startswith("rowwise int4 ") and r.endswith("x128 (fp16 scale+bias)") for r in held.values())
    atol, rtol = path_tolerance("bf16-dense")
    for b in (1, 64):
        batch = multi_hot(model, b, seed=b)
        with torch.no_grad():
            ref = model(*batch.inputs()).numpy()
        np.testing.assert_allclose(pred.logits(*batch.inputs(), path="torch-fast"), ref, atol=atol, rtol=rtol)
