import torch

from benchmarks.kaggle_model import TABLE_STD, kaggle_model
from benchmarks.performance import compressed_tables, table, time_stages
from targets.native.engine import FastDLRM, FastInt8DLRM

torch.set_num_threads(1)
ROWS = (50, 7, 300) + (20,) * 23          # 26 features, small tables


def test_kaggle_shape_and_trained_like_scale():
    model = kaggle_model(ROWS)
    assert len(model.spec.features) == 26 and model.spec.bottom == (512, 256, 64, 16)
    assert model.top[0].in_features == 16 + 27 * 26 // 2 == 367
    w = torch.cat([t.weight.detach() for t in model.embeddings.values()])
    assert abs(float(w.std()) - TABLE_STD) < 0.01
    first = model.bottom[0].weight.detach()
    assert abs(float(first.std()) - (2 / (13 + 512)) ** 0.5) < 0.01
    assert torch.equal(kaggle_model(ROWS).top[0].weight, model.top[0].weight)     # seeded


def test_stage_timings_cover_every_stage_and_variant(monkeypatch, tmp_path):
    import benchmarks.performance as perf

    monkeypatch.setattr(perf, "STAGE_BATCHES", {1: 2, 2048: 1})
    monkeypatch.setattr(perf, "STAGE_ROUNDS", 1)
    model = kaggle_model(ROWS)
    rows = time_stages(model, FastDLRM(model).eval(), FastInt8DLRM(model).eval(), None, compressed_tables(model))
    stages = {(r["batch"], r["stage"]) for r in rows}
    assert stages == {(b, s) for b in (1, 2048) for s in
                      ("embedding", "bottom MLP", "interaction", "embedding + interaction", "top MLP", "whole model")}
    emb = [r for r in rows if r["stage"] == "embedding" and r["batch"] == 2048]
    assert all(r["rows_per_s"] == 2048 * 26 / (r["ms"] / 1e3) for r in emb)
    assert {"fp16", "int8", "int4"} <= {r["variant"].split(", ")[1].split()[0] for r in emb if ", " in r["variant"]}
    assert all(r["ms"] > 0 for r in rows)
    at_one = {(r["stage"], r["variant"]) for r in rows if r["batch"] == 1 and r["variant"].startswith("torch-fast")}
    assert at_one == {("whole model", "torch-fast"), ("whole model", "torch-fast-int8")}   # one C++ call there
    assert "| 2048 | top MLP | torch-fast-int8 |" in table({"whole": {"results": []}, "stages": rows})
    perf.plot(rows, tmp_path / "stages.png")
    assert (tmp_path / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
