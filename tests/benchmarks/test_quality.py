"""benchmarks/quality.py: the passes of a point, the goal bookkeeping and the Pareto plot."""

import json

import numpy as np

from benchmarks.quality import augmented, build, goals, markdown, merged, plot


def point(rep, ratio, fitted, recovered):
    return {"representation": rep, "target": round(ratio), "compression": ratio, "delta_auc_fitted": fitted,
            "delta_auc_recovered": recovered, "recover_steps": 10, "fit_seconds": 1.0, "recover_seconds": 2.0}


def test_a_point_compresses_large_tables_and_quantizes_the_rest():
    main, rest = build("robe", 17.5, 16)
    assert str(main).startswith("robe:") and main.config.compression == 17.5 and main.config.min_rows == 100
    assert rest.name == "quantize" and rest.config.bits == 4
    assert build("tt", 60, 50)[1].config.bits == 2
    main, rest = build("mdq", 20, 16)                  # mdq's small tables: its own full-width form
    assert main.config.compression == 20 and rest.name == "mdq" and rest.config.energy == 1
    assert (rest.config.bits, build("mdq", 60, 50)[1].config.bits) == (4, 2)


def test_augmented_rows_are_unlabelled_copies_with_the_item_side_permuted(tmp_path):
    rng = np.random.default_rng(0)
    x_int, x_cat = rng.integers(0, 9, (50, 7)).astype(np.int32), rng.integers(0, 9, (50, 11)).astype(np.int32)
    np.savez(tmp_path / "train.npz", X_int=x_int, X_cat=x_cat, y=np.zeros(50, np.int32))
    assert augmented(tmp_path, tmp_path / "train.npz", 0) is None
    out = augmented(tmp_path, tmp_path / "train.npz", 2)
    z = np.load(out)
    assert out.name == "distill2.npz" and "y" not in z and z["X_cat"].shape == (150, 11)
    np.testing.assert_array_equal(z["X_cat"][:50], x_cat)
    np.testing.assert_array_equal(z["X_cat"][50:100, 0], x_cat[:, 0])          # the user stays
    assert sorted(z["X_cat"][50:100, 1]) == sorted(x_cat[:, 1])                  # items permuted


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


def test_a_plan_within_the_bound_counts_towards_the_goal():
    pts = [point("mdq", 116.0, -0.005, -0.004)]
    plan = {"found": True, "bundle_embedding_compression": 100.05, "bundle_delta_auc_test": -0.0008}
    assert goals(pts, "synthetic") == [{"goal": ">= 100x within 0.001 AUC", "best_compression": None, "by": None,
                                        "met": False}]
    g = goals(pts, "synthetic", plan)[0]
    assert (g["best_compression"], g["by"], g["met"]) == (100.05, "plan", True)
    assert not goals(pts, "synthetic", {**plan, "bundle_delta_auc_test": -0.0011})[0]["met"]
    assert not goals(pts, "synthetic", {"found": False, "error": "no plan"})[0]["met"]


def test_merge_keeps_the_data_sets_this_run_did_not_measure():
    old = {"command": "benchmarks/quality.py --datasets movielens", "seconds": 1800.0,
           "datasets": {"movielens": {"points": [1]}, "synthetic": {"points": [2]}}}
    new = {"command": "benchmarks/quality.py --datasets synthetic", "seconds": 60.0,
           "datasets": {"synthetic": {"points": [3], "measured": {"command": "new"}}}}
    out = merged(old, new)
    assert list(out["datasets"]) == ["movielens", "synthetic"] and out["command"] == new["command"]
    assert out["datasets"]["synthetic"]["points"] == [3]
    assert out["datasets"]["movielens"] == {"points": [1], "measured": {"command": old["command"], "seconds": 1800.0}}
