"""What ``rewrite inspect`` reports about a model (schema in docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewrite.formats import detect
from rewrite.core.model import RecModel

INSPECT_VERSION = 1


def describe_model(model: RecModel, path: Path) -> dict[str, Any]:
    spec = model.spec
    return {
        "schema": f"inspect/{INSPECT_VERSION}",
        "path": str(path),
        # the file's format; a native file keeps where its model came from in provenance
        "format": "native" if detect(path) == "native" else spec.provenance.get("format", "unknown"),
        "n_dense": spec.n_dense,
        "bottom_mlp": [spec.n_dense, *spec.bottom],
        "top_mlp": list(spec.top),
        "interaction": spec.interaction,
        "interaction_pairs": spec.pairs,
        "cross_layers": spec.cross_layers,     # "dcn": low-rank cross net depth and rank
        "cross_rank": spec.cross_rank,
        "features": [{"name": f, "table": t} for f, t in spec.features],
        "tables": [{"name": name, "rows": rep.rows, "dim": rep.dim, "pooling": rep.pooling,
                    "representation": rep.kind, "describe": rep.describe(), "params": rep.params(),
                    "bytes": rep.num_bytes()}
                   for name, rep in model.embeddings.items()],
        "embedding_bytes": model.embedding_bytes(),
        "dense_bytes": model.dense_bytes(),
        "provenance": spec.provenance,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def describe_bundle(bundle) -> dict[str, Any]:
    """``inspect`` of a bundle: the model it was lowered from, per path what it holds, and
    ``embedding_bytes`` of the default path (what serving the default path keeps in memory)."""
    from rewrite.core.model_file import load

    default = bundle.default_path
    model_file = bundle.reference_file(default)
    info = describe_model(load(model_file), model_file)
    info["path"], info["format"] = str(bundle.root), "bundle"
    info["source"] = bundle.manifest["source"]
    info["default_path"] = default
    info["embedding_bytes"] = bundle.paths[default]["embedding_bytes"]
    info["paths"] = {
        name: {k: p.get(k) for k in ("target", "precision", "devices", "representations",
                                      "embedding_bytes", "dense_bytes", "footprint_bytes",
                                      "latency_ms", "plan_path")}
        | {"verified": p["verification"]["passed"],
           "max_abs_prob_error": p["verification"].get("max_abs_prob_error")}
        for name, p in bundle.paths.items()}
    info["dispatch"] = bundle.manifest["dispatch"]
    for key in ("passes", "plan"):
        if key in bundle.manifest:
            info[key] = bundle.manifest[key]
    if "variants" in bundle.manifest:
        info["variants"] = {n: {k: v[k] for k in ("passes", "verified", "same_as", "embedding_bytes",
                                                 "dense_bytes", "paths") if k in v}
                            for n, v in bundle.manifest["variants"].items()}
    return info
