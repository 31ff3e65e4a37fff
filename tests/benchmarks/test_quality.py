"""benchmarks/quality.py: the passes of a point, the goal bookkeeping and the Pareto plot."""

import json

from benchmarks.quality import build, goals, markdown, plot


def point(rep, ratio, fitted, recovered):
    return {"representation": rep, "target": round(ratio), "compression": ratio, "delta_auc_fitted": fitted,
            "delta_auc_recovered": recovered, "recover_steps": 10, "fit_seconds": 1.0, "recover_seconds": 2.0}


def test_a_point_compresses_large_tables_and_quantizes_the_rest():
    main, rest = build("robe", 17.5, 16)
    assert str(main).startswith("robe:") and main.config.compression == 17.5 and main.config.min_rows == 100
    assert rest.name == "quantize" and rest.config.bits == 4
    assert build("tt", 60, 50)[1].config.bits == 2


def test_goals_take_the_largest_ratio_within_each_auc_drop(tmp_path):
    pts = [point("robe", 8.1, -0.02, -0.0004), point("robe", 16.2, -0.05, -0.004), point("tt", 51.0, -0.08, -0.006)]
    g = goals(pts, "movielens")
    assert g[0] == {"goal": ">= 16x within 0.001 AUC", "best_compression": 8.1, "by": "robe", "met": False}
    assert g[1]["best_compression"] == 16.2 and not g[1]["met"]
    result = {"seconds": 60.0, "datasets": {"movielens": {"baseline_auc": 0.79, "test_rows": 100, "embedding_bytes": 1000,
                                                          "points": pts, "goals": g}}}
    plot(result, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown(json.loads(json.dumps(result)))
    assert "| robe | 8× | 8.1× | -0.0200 | -0.0004 |" in text and "not met" in text
