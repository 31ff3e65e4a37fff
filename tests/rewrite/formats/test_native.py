"""The toolkit's own format: safetensors weights + the versioned JSON spec in its metadata.

save -> load is bit-exact for every representation and storage dtype the foundation holds, the
write is atomic, and a tampered file gets one line naming the file and the problem."""

from __future__ import annotations

import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

import rewrite
from passes.mixed_dim import MDBag
from passes.quotient_remainder import QRBag
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.formats import native
from rewrite.core.model import SPEC_VERSION


def _filled(rep, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rep.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return rep


@pytest.fixture
def mixed_model(make_dlrm):
    """Plain fp32, fp16 and bf16 tables, QR (mult, pool-first dlrm semantics) and MD, in one model."""
    base = make_dlrm(rows=(2, 17, 300, 1000, 50))
    return base.with_tables({
        "t1": _filled(TableBag(17, 8, dtype="float16"), 1),
        "t2": _filled(QRBag(300, 8, 7, op="mult", pool_first=True, float_quotient=True), 2),
        "t3": _filled(MDBag(1000, 8, 3), 3),
        "t4": _filled(TableBag(50, 8, pooling="mean", dtype="bfloat16"), 4),
    })


def test_round_trip_is_bit_exact(mixed_model, tmp_path, make_batch):
    path = tmp_path / "m.safetensors"
    mixed_model.spec.provenance.update(format="dlrm", metadata={"test_auc": 0.77})
    rewrite.save(mixed_model, path)
    loaded = rewrite.load(path)
    before, after = mixed_model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert loaded.spec == mixed_model.spec
    assert loaded.spec.provenance == mixed_model.spec.provenance
    assert loaded.full_spec() == mixed_model.full_spec()
    assert [type(r) for r in loaded.embeddings.values()] == [type(r) for r in mixed_model.embeddings.values()]
    assert loaded.embeddings["t1"].weight.dtype == torch.float16
    assert loaded.embeddings["t4"].weight.dtype == torch.bfloat16
    batch = make_batch(rows=(2, 17, 300, 1000, 50), batch=40, mean_len=3.0, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(*batch.inputs()), mixed_model(*batch.inputs()))


def test_round_trip_of_a_loaded_dlrm_checkpoint(tmp_path, make_batch):
    from tests.reference_dlrm import DLRM_Net, save_like_dlrm

    net = DLRM_Net(8, [2, 17, 300, 1000], [5, 16, 8], [18, 8, 1], qr_flag=True, qr_collisions=4)
    save_like_dlrm(net, tmp_path / "m.pt")
    model = rewrite.load(tmp_path / "m.pt")
    rewrite.save(model, tmp_path / "m.safetensors")
    again = rewrite.load(tmp_path / "m.safetensors")
    batch = make_batch(batch=16, seed=8)
    with torch.no_grad():
        assert torch.equal(again(*batch.inputs()), model(*batch.inputs()))
    assert again.spec.provenance["format"] == "dlrm"


def test_write_is_atomic(small_dlrm, tmp_path, monkeypatch):
    path = tmp_path / "out" / "m.safetensors"
    rewrite.save(small_dlrm, path)
    assert os.listdir(path.parent) == ["m.safetensors"]
    good = path.read_bytes()

    def crash(f, tensor, bar, pages):   # the header and part of a tensor written, then the disk fills
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(native, "write_tensor", crash)
    with pytest.raises(OSError, match="disk full"):
        rewrite.save(small_dlrm, path)
    with pytest.raises(OSError, match="disk full"):
        rewrite.save(small_dlrm, tmp_path / "out" / "new.safetensors")
    assert os.listdir(path.parent) == ["m.safetensors"], "a temp file or a partial target was left"
    assert path.read_bytes() == good, "the existing file was touched by the failed write"


def _write(path, tensors, spec):
    meta = None if spec is None else {native.META_KEY: spec if isinstance(spec, str) else json.dumps(spec)}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def _parts(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}, model.full_spec()


def expect_error(path, *fragments) -> None:
    with pytest.raises(RewriteError) as e:
        rewrite.load(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in (str(path), *fragments):
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def _set(d, *keys_and_value):
    *keys, last, value = keys_and_value
    for k in keys:
        d = d[k]
    d[last] = value


TAMPERED_SPECS = {
    "newer version": (lambda s: _set(s, "version", SPEC_VERSION + 1),
                      [f"spec version {SPEC_VERSION + 1} is newer than this toolkit's ({SPEC_VERSION})"]),
    "version text": (lambda s: _set(s, "version", "1"), ["spec version must be an integer, got '1'"]),
    "no version": (lambda s: s.pop("version"), ["not valid JSON with a version"]),
    "no model": (lambda s: s.pop("model"), ["malformed spec: KeyError: 'model'"]),
    "unknown kind": (lambda s: _set(s, "tables", 0, "kind", "no-such-kind"),
                     ["unknown representation 'no-such-kind'", "(known: ", "table"]),
    "negative rows": (lambda s: _set(s, "tables", 0, "rows", -3), ["malformed spec", "negative dimension"]),
    "unknown param": (lambda s: _set(s, "tables", 0, "colour", "red"),
                      ["malformed spec", "unexpected keyword argument 'colour'"]),
    "bad dtype": (lambda s: _set(s, "tables", 0, "dtype", "float7"), ["malformed spec", "float7"]),
    "bad pairs": (lambda s: _set(s, "model", "pairs", "upper"),
                  ["malformed spec", "unknown interaction pair order 'upper'"]),
    "table not in spec": (lambda s: _set(s, "model", "features", [["f0", "t9"]]),
                          ["malformed spec", "'t9'"]),
    "rows disagree": (lambda s: _set(s, "tables", 3, "rows", 999),
                      ["tensor embeddings.t3.weight is (1000, 8) torch.float32, the spec says (999, 8)"]),
    "dtype disagrees": (lambda s: _set(s, "tables", 0, "dtype", "float16"),
                        ["tensor embeddings.t0.weight is (2, 8) torch.float32", "torch.float16"]),
}


@pytest.mark.parametrize("case", list(TAMPERED_SPECS))
def test_tampered_spec(case, small_dlrm, tmp_path):
    edit, fragments = TAMPERED_SPECS[case]
    tensors, spec = _parts(small_dlrm)
    edit(spec)
    _write(tmp_path / "m.safetensors", tensors, spec)
    expect_error(tmp_path / "m.safetensors", *fragments)


def test_metadata_missing_or_not_json(small_dlrm, tmp_path):
    tensors, _ = _parts(small_dlrm)
    _write(tmp_path / "none.safetensors", tensors, None)
    expect_error(tmp_path / "none.safetensors", "without a dlrm-rewrite spec", native.META_KEY,
                 "not written by this toolkit")
    _write(tmp_path / "junk.safetensors", tensors, "{not json")
    expect_error(tmp_path / "junk.safetensors", "not valid JSON with a version")


def test_tensors_that_do_not_match(small_dlrm, tmp_path):
    tensors, spec = _parts(small_dlrm)
    _write(tmp_path / "missing.safetensors", {k: v for k, v in tensors.items() if k != "top.0.bias"}, spec)
    expect_error(tmp_path / "missing.safetensors", "tensors do not match the spec", "missing ['top.0.bias']")
    _write(tmp_path / "extra.safetensors", {**tensors, "embeddings.t9.weight": torch.zeros(2)}, spec)
    expect_error(tmp_path / "extra.safetensors", "unexpected ['embeddings.t9.weight']")
    _write(tmp_path / "shape.safetensors", {**tensors, "bottom.0.weight": torch.zeros(16, 4)}, spec)
    expect_error(tmp_path / "shape.safetensors", "tensor bottom.0.weight is (16, 4) torch.float32, "
                 "the spec says (16, 5) torch.float32")


def test_truncated_or_corrupt_file(small_dlrm, tmp_path):
    rewrite.save(small_dlrm, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 100])
    expect_error(tmp_path / "cut.safetensors", "not a readable safetensors file")
    header_len = int.from_bytes(raw[:8], "little")
    (tmp_path / "header.safetensors").write_bytes(raw[:8] + b"{" + b"x" * (header_len - 1) + raw[8 + header_len:])
    expect_error(tmp_path / "header.safetensors", "not a readable safetensors file")
