"""A small compiled bundle shared by the artifact, runtime and CLI tests."""

from __future__ import annotations

from pathlib import Path

from rewrite.bundling import compile_model
from rewrite.core.model_file import save
from tests.representations import composite_model

TARGETS = ["onnx-cpu", "torch"]
LATENCY_SIZES = (1, 64)


def make_bundle(root: Path) -> tuple[Path, Path, dict]:
    """(source checkpoint, bundle dir, manifest) of the composite model on onnx-cpu and torch."""
    model = composite_model()
    source = root / "model.safetensors"
    save(model, source)
    out = root / "bundle"
    manifest = compile_model(model, out, TARGETS, source=source, latency_sizes=LATENCY_SIZES)
    return source, out, manifest
