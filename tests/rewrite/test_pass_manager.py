"""The pass manager: selection, skips in the report, verification gates, report JSON, purity."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import passes
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError, VerificationError
from rewrite.core.pass_contract import PASSES, Rewrite, Selection, configure, register_pass
from rewrite.pass_manager import apply, require_within_tolerance
from tests.pass_helpers import batches, small_model, with_table

torch.set_num_threads(1)


def labelled(model, n=2):
    out = batches(model, n=n)
    g = torch.Generator().manual_seed(0)
    for b in out:
        b.labels = (torch.rand(b.size, generator=g) < 0.3).float()
    return out


def test_selection_by_name_and_size():
    model = small_model(rows=(3, 40, 257, 1000))
    _, report = apply(model, [passes.quantize(tables=("t0", "t3"), min_rows=100)])
    assert [(t.table, t.status, t.reason) for t in report.tables] == [
        ("t0", "skipped", "3 rows < min_rows=100"), ("t3", "rewritten", "")]
    _, report = apply(model, [passes.qr()])       # default min_rows 201: dlrm's threshold
    assert {t.table: t.status for t in report.tables} == {
        "t0": "skipped", "t1": "skipped", "t2": "rewritten", "t3": "rewritten"}


def test_unknown_table_fails_before_any_pass_runs():
    with pytest.raises(RewriteError, match=r"pass md: unknown table\(s\) t9 \(tables: t0, t1, t2, t3\)"):
        apply(small_model(), [passes.quantize(), passes.md(tables=("t9",))])


def test_passes_compose_in_order_and_report_skips():
    g = torch.Generator().manual_seed(0)
    model = with_table(small_model(), "t3", torch.randn(1000, 2, generator=g) @ torch.randn(2, 8, generator=g))
    rw, report = apply(model, [passes.md(energy=0.9, tables=("t3",)), passes.quantize(bits=8)])
    kinds = {name: rep.kind for name, rep in rw.embeddings.items()}
    assert kinds == {"t0": "table", "t1": "rowwise", "t2": "rowwise", "t3": "md"}
    skipped = {(t.pass_name, t.table): t.reason for t in report.tables if t.status == "skipped"}
    assert skipped[("quantize", "t3")] == "quantize rewrites fp32 plain tables, this is md 1000x" \
        f"{rw.embeddings['t3'].inner_dim} -> 8"
    assert skipped[("quantize", "t0")].startswith("the int8 form")


def test_original_model_untouched():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.embeddings)
    rw, _ = apply(model, [passes.quantize(bits=4), passes.hash()])
    assert dict(model.embeddings) == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert rw is not model and rw.embeddings["t3"] is not model.embeddings["t3"]


def test_report_json_keys_with_and_without_labels():
    model = small_model()
    _, report = apply(model, [passes.quantize(bits=8)], sample=labelled(model))
    d = report.to_json()
    for key in ("embedding_bytes_before", "embedding_bytes_after", "compression", "max_abs_logit_diff",
                "mean_abs_logit_diff", "samples", "within_tolerance", "tables",
                "auc_before", "auc_after", "logloss_before", "logloss_after"):
        assert key in d, key
    assert d["embedding_bytes_before"] == model.embedding_bytes() == 4 * 8 * (3 + 40 + 257 + 1000)
    assert d["samples"] == 128 and 0 < d["max_abs_logit_diff"] < 0.1
    table = d["tables"][-1]
    for key in ("table", "pass_name", "status", "reason", "before", "after", "bytes_before", "bytes_after",
                "max_abs_diff", "rel_error", "tolerance", "within_tolerance", "fit_seconds", "notes"):
        assert key in table, key
    _, unlabelled = apply(model, [passes.quantize(bits=8)])
    assert "auc_before" not in unlabelled.to_json()


def test_tolerance_failure_raises_verification_error():
    model = small_model(rows=(300, 400, 500, 1000))
    _, report = apply(model, [passes.hash(max_error=0.01)])
    assert not report.ok
    with pytest.raises(VerificationError) as e:
        require_within_tolerance(report)
    msg = str(e.value)
    assert msg.startswith("rewrite exceeds its tolerance on t0 (hash: relative error <= 0.01; max |Δ| ")
    assert msg.endswith(" and 1 more tables; use --allow-degraded to keep it anyway")
    assert e.value.exit_code == 1


def test_analytic_bound_is_enforced():
    @dataclass(frozen=True)
    class Cfg(Selection):
        pass

    @register_pass("_overclaiming", Cfg)
    def run(site, cfg, ctx):
        w = site.module(ctx.model).weight.detach()
        return Rewrite(TableBag(site.rows, site.dim, weight=w + 0.01), error_bound=0.001)

    try:
        _, report = apply(small_model(), [configure("_overclaiming", tables="t3")])
        t = report.tables[0]
        assert not t.within_tolerance and t.tolerance.startswith("max |Δ| per id <= 0.001")
        assert t.max_abs_diff >= 0.01 * (1 - 1e-5)
    finally:
        del PASSES["_overclaiming"]


def test_a_run_that_skips_every_table_is_a_result_with_recovery_too(tmp_path):
    """dhe at its default (compression 8) cannot fit a decoder in 1/8 of a 2- or 3-row table: every
    table skipped, exit 0, a summary line that says so, and --recover reports nothing to train."""
    from click.testing import CliRunner

    from rewrite.cli import main
    from rewrite.core.model_file import save
    from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz

    save(small_model(rows=(2, 3)), tmp_path / "m.safetensors")
    write_npz(tmp_path / "day.npz", *Synthetic(SyntheticConfig(rows=(2, 3), n_pairs=1)).sample(200, seed=0))
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(main, ["apply", str(tmp_path / "m.safetensors"), "-p", "dhe", "--recover",
                                    str(tmp_path / "day.npz"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "no table rewritten: every selected table was skipped (reasons above); the model is unchanged" in res.output
    assert ("skipped: no rewritten table differs from the original and train_top is off: nothing to train"
            in res.output)
    assert "t0      dhe       skipped: dhe's smallest form" in res.output and out.exists()
    res = CliRunner().invoke(main, ["apply", str(tmp_path / "m.safetensors"), "-p", "dhe", "--json",
                                    "-o", str(tmp_path / "out2.safetensors")])
    assert res.exit_code == 0 and '"tables_rewritten": 0' in res.output


def test_rewrites_of_mapped_tables_are_spilled_and_verified_the_same(tmp_path, make_dlrm):
    """A model read from a file (tables mapped): every rewritten table moves to a scratch file
    (mapped, not anonymous memory); the result and the report are those of the in-memory model."""
    import rewrite
    from rewrite.core import mapped

    model = make_dlrm(rows=(3, 100_000, 50), dim=16)
    path = tmp_path / "m.safetensors"
    rewrite.save(model, path)
    from_file = rewrite.load(path)
    assert mapped.is_mapped(from_file.embeddings["t1"].weight)
    spilled, report = apply(from_file, [passes.quantize(bits=4)])
    in_memory, expected = apply(model, [passes.quantize(bits=4)])
    assert mapped.is_mapped(spilled.embeddings["t1"].packed)            # 1.2 MB: spilled
    assert not mapped.is_mapped(in_memory.embeddings["t1"].packed)
    assert torch.equal(spilled.embeddings["t1"].packed, in_memory.embeddings["t1"].packed)
    assert report.max_abs_logit_diff == expected.max_abs_logit_diff
    rewrite.save(spilled, tmp_path / "a.safetensors")
    rewrite.save(in_memory, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
