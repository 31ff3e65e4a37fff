import json

import torch

from benchmarks.fused_representations import VARIANTS, main
from benchmarks.kaggle_model import kaggle_model
from rewrite.core.model_file import save

torch.set_num_threads(1)
ROWS = (300, 100_001) + (20,) * 24        # one table above the 200-row threshold, one above TT's


def test_every_variant_is_timed_against_the_plain_model_in_one_run(monkeypatch, tmp_path):
    import benchmarks.fused_representations as bench

    monkeypatch.setattr(bench, "SIZES", {1: 2, 64: 1})
    save(kaggle_model(ROWS), tmp_path / "m.safetensors")
    assert main([str(tmp_path / "m.safetensors"), "--rounds", "1", "--hardware", "zen4",
                 "-o", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["threads"] == 1 and len(doc["loadavg_before"]) == 3 and doc["isa_tier"]
    models = {"plain fp32", *VARIANTS}
    assert {(r["batch"], r["model"]) for r in doc["summary"]} == {(b, m) for b in (1, 64) for m in models}
    for r in doc["summary"]:
        assert r["best_path"] in ("torch-fast", "torch-fast-int8") and r["best_ms"] > 0 and r["stage_ms"] > 0
        assert r["ratio_vs_plain"] > 0 and (r["model"] != "plain fp32" or r["ratio_vs_plain"] == 1.0)
        assert r["limit_ms"] > 0 and r["of_limit"] == r["limit_ms"] / r["best_ms"]
        assert r["mlp_dtype"] == ("int8" if r["best_path"] == "torch-fast-int8" else "bf16")   # zen4 has both
    assert doc["limit"]["hardware"] == "zen4"
