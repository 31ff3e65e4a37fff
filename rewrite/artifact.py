"""The deployable bundle: one directory, a manifest, one folder per path.

    bundle/
      manifest.json              format + version, model spec, source checkpoint + sha256, library
                                 versions, one entry per path, the dispatch policy, every file's sha256
      reference/model.safetensors   the original model (native format): what verify and bench compare to
      rewritten/model.safetensors   (-p) the rewritten model the paths were lowered from
      rewritten/<pK>.safetensors    (--plan, format 2) each verified plan path's rewritten model
      <path>/...                 what the path's target wrote (model.onnx, model.pt2, ...)

A bundle is written into a temporary sibling and renamed into place (``rewrite.core.atomic``), so a
reader sees a whole bundle or none.  Format 2 adds the optional ``variants`` (plan paths and
their rewritten models, checksummed like every file), ``plan`` and ``passes`` keys; format 1
bundles load unchanged.  ``open_bundle`` refuses a bundle whose format version is
newer, whose manifest is missing or malformed, or whose files are missing or differ from their
recorded sha256 (tampered or partial).  This module imports nothing from the compiler side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rewrite.core.errors import RewriteError

FORMAT = "dlrm-rewrite-bundle"
FORMAT_VERSION = 2   # 2: variants/plan/passes keys (plan bundles); 1 still loads
MANIFEST = "manifest.json"
REFERENCE_FILE = "reference/model.safetensors"
HASH_CHUNK = 1 << 24  # bytes read per update while hashing (16 MiB)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


@dataclass
class Bundle:
    """A bundle on disk whose manifest and checksums were checked."""

    root: Path
    manifest: dict[str, Any]

    @property
    def paths(self) -> dict[str, dict[str, Any]]:
        return self.manifest["paths"]

    @property
    def n_features(self) -> int:
        return len(self.manifest["model"]["model"]["features"])

    @property
    def n_dense(self) -> int:
        return int(self.manifest["model"]["model"]["n_dense"])

    def table_rows(self) -> list[int]:
        """Row count of each feature's table, in feature order."""
        rows = {t["name"]: int(t["rows"]) for t in self.manifest["model"]["tables"]}
        return [rows[t] for _, t in self.manifest["model"]["model"]["features"]]

    def verified_paths(self) -> list[str]:
        return [n for n, p in self.paths.items() if p["verification"]["passed"]]

    @property
    def default_path(self) -> str:
        return self.manifest["dispatch"]["default_path"]

    def path_for_batch(self, batch: int) -> str:
        """The path the dispatch policy picks for a batch of ``batch`` samples."""
        from rewrite.dispatch import route

        return route(self.manifest["dispatch"]["ranges"], batch, self.default_path)

    def path_dir(self, name: str) -> Path:
        return self.root / self.paths[name]["folder"]

    def reference_file(self, name: str | None = None) -> Path:
        """The native model a path was lowered from (the original model if name is None)."""
        rel = self.paths[name]["lowered_from"] if name else self.manifest["reference"]["path"]
        return self.root / rel


def all_files(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield manifest["reference"]
    if "rewritten" in manifest:
        yield manifest["rewritten"]
    for variant in manifest.get("variants", {}).values():
        if "model" in variant:
            yield variant["model"]
    for entry in manifest["paths"].values():
        yield from entry["files"]


def open_bundle(root: Path | str, check_files: bool = True) -> Bundle:
    """Read and check a bundle: format, version, and (``check_files``) every file's sha256."""
    root = Path(root)
    if not root.is_dir():
        raise RewriteError(f"{root}: not a bundle directory (run `rewrite compile MODEL -o {root}`)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise RewriteError(f"{root}: a directory with no {MANIFEST}; not a bundle, or a partial one")
    try:
        manifest = json.loads(mpath.read_text())
        fmt, version = manifest["format"], int(manifest["format_version"])
    except (ValueError, KeyError, TypeError):
        raise RewriteError(f"{mpath}: malformed manifest (not JSON with format and format_version)") from None
    if fmt != FORMAT:
        raise RewriteError(f"{mpath}: format {fmt!r} is not {FORMAT!r}")
    if version > FORMAT_VERSION:
        raise RewriteError(f"{mpath}: bundle format version {version} is newer than this toolkit's "
                           f"({FORMAT_VERSION}); upgrade dlrm-rewrite")
    if not _well_formed(manifest):
        raise RewriteError(f"{mpath}: malformed manifest (missing paths, files, dispatch or model)")
    files = list(all_files(manifest))
    for f in files:
        p = root / f["path"]
        if not p.resolve().is_relative_to(root.resolve()):
            raise RewriteError(f"{mpath}: file {f['path']!r} lies outside the bundle")
        if not p.is_file():
            raise RewriteError(f"{root}: missing file {f['path']} listed in the manifest (partial bundle)")
        if check_files and (p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]):
            raise RewriteError(f"{root}: {f['path']} does not match its sha256 in the manifest "
                               f"(modified or corrupted); recompile the bundle")
    return Bundle(root, manifest)


def _well_formed(manifest: dict[str, Any]) -> bool:
    try:
        files = list(all_files(manifest))
        return (all({"path", "bytes", "sha256"} <= set(f) for f in files)
                and isinstance(manifest["dispatch"]["ranges"], list)
                and isinstance(manifest["model"]["model"]["features"], list)
                and all({"target", "folder", "files", "verification", "lowered_from"} <= set(p)
                        for p in manifest["paths"].values()))
    except (KeyError, TypeError, AttributeError):
        return False


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
