"""Recovery (distillation): a degraded model gets closer to the original on held-out data, the
inputs stay untouched, fp16 tables train through fp32 masters, integer tensors stay frozen,
errors are one clear line, and the CLI-facing helpers parse and validate their options."""

import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import passes
import rewrite
from rewrite import data
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.recovery import add_recovery_options, changed_tables, recover, run_recovery_from_cli
from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz
from rewrite.training import evaluate, table_dlrm, train

torch.set_num_threads(1)
ROWS = (60, 400, 30, 8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained teacher on synthetic day 0, held-out day 1, and a ROBE-degraded student."""
    d = tmp_path_factory.mktemp("recovery")
    gen = Synthetic(SyntheticConfig(rows=ROWS, n_pairs=4, seed=1))
    write_npz(d / "day_0.npz", *gen.sample(8000, seed=0))
    write_npz(d / "day_1.npz", *gen.sample(4000, seed=1))
    day0, day1 = data.open(d / "day_0.npz"), data.open(d / "day_1.npz")
    teacher = train(table_dlrm(list(ROWS), dim=8, seed=0), day0, epochs=2, lr=1e-2)
    prof = rewrite.profile(teacher, day0)
    student, _ = rewrite.apply(teacher, [passes.robe(compression=8, block=4, tables=("t0", "t1", "t2"))],
                               profile=prof)
    return d, teacher, student, day0, day1


def test_recovery_improves_logit_error_and_auc_on_held_out_data(world):
    _, teacher, student, day0, day1 = world
    rec, report = recover(teacher, student, day0, steps=150, lr=1e-2, eval_data=day1, seed=0)
    ev = report.eval
    assert ev["logit_rmse_recovered"] < 0.8 * ev["logit_rmse_rewritten"]
    assert ev["auc_recovered"] > ev["auc_rewritten"] + 0.005
    assert ev["auc_original"] == pytest.approx(evaluate(teacher, day1).auc)
    assert report.holdout_loss_after < report.holdout_loss_before
    assert report.tables == ["t0", "t1", "t2"] and not report.train_top
    assert report.best_step > 0 and report.steps <= 150
    assert all(n.endswith(("_a", "_b", "lane")) for n in report.frozen) and report.frozen
    json.dumps(report.to_json())


def test_inputs_are_not_modified(world):
    _, teacher, student, day0, _ = world
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    for p in teacher.parameters():
        p.grad = None                                         # training the teacher left some
    rec, _ = recover(teacher, student, day0, steps=20, train_top=True)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_t[k]), k
    for k, v in student.state_dict().items():
        assert torch.equal(v, before_s[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert not torch.equal(rec.top[0].weight, teacher.top[0].weight)
    assert rec.embeddings["t3"] is teacher.embeddings["t3"]     # untouched tables are shared


def test_fp16_table_trains_through_an_fp32_master(world):
    _, teacher, _, day0, day1 = world
    w = teacher.embeddings["t1"].weight.detach()
    noisy = TableBag(400, 8, dtype="float16", weight=w + 0.3 * torch.randn_like(w))
    student = teacher.with_tables({"t1": noisy})
    assert changed_tables(teacher, student) == ["t1"]
    rec, report = recover(teacher, student, day0, steps=100, lr=1e-2, eval_data=day1)
    assert rec.embeddings["t1"].weight.dtype == torch.float16
    assert report.eval["logit_rmse_recovered"] < 0.8 * report.eval["logit_rmse_rewritten"]


def test_unlabelled_data_distils_logits_only(world, tmp_path):
    d, teacher, student, _, day1 = world
    src = np.load(d / "day_0.npz")
    np.savez(tmp_path / "unlabelled.npz", X_int=src["X_int"], X_cat=src["X_cat"])
    unlabelled = data.open(tmp_path / "unlabelled.npz")
    assert unlabelled.labels is None
    _, report = recover(teacher, student, unlabelled, steps=60, lr=1e-2, eval_data=day1)
    assert report.eval["logit_rmse_recovered"] < report.eval["logit_rmse_rewritten"]


def test_early_stopping_keeps_the_best_state(world):
    _, teacher, student, day0, _ = world
    _, report = recover(teacher, student, day0, epochs=20, lr=0.5, eval_every=5, patience=2)
    assert report.stopped_early and report.steps < 20 * 8
    best = min(h for _, h in report.history)
    assert report.holdout_loss_after == best


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 5, "epochs": 1}, "recovery: give steps or epochs, not both"),
    ({"steps": 0}, "recovery: steps must be >= 1 and epochs > 0"),
    ({"lr": 0.0}, "recovery: need lr > 0"),
    ({"tables": ["nope"]}, "recovery: unknown table\\(s\\) nope"),
])
def test_errors(world, kwargs, message):
    _, teacher, student, day0, _ = world
    with pytest.raises(RewriteError, match=message):
        recover(teacher, student, day0, **kwargs)


def test_nothing_to_train_and_mismatched_data(world, tmp_path):
    _, teacher, _, day0, _ = world
    same, report = recover(teacher, teacher, day0, steps=1)      # a result, not an error
    assert same is teacher and report.steps == 0 and report.tables == []
    assert report.skipped == "no rewritten table differs from the original and train_top is off: nothing to train"
    other = Synthetic(SyntheticConfig(rows=(10, 10), n_pairs=1))
    write_npz(tmp_path / "other.npz", *other.sample(100, seed=0))
    with pytest.raises(RewriteError, match="data has 13 dense and 2 categorical columns, the model takes 13 and 4"):
        recover(teacher, teacher, data.open(tmp_path / "other.npz"), steps=1, train_top=True)


@click.command()
@click.argument("model_path")
@add_recovery_options
def apply_like(model_path, recover_path, recover_steps, recover_epochs, recover_lr, eval_path, recover_top):
    """A stand-in for ``rewrite apply``: rewrites, then hands over to the recovery helper."""
    teacher = rewrite.load(model_path)
    student, _ = rewrite.apply(teacher, [passes.robe(compression=8, block=4, tables=("t1",))])
    try:
        _, report = run_recovery_from_cli(teacher, student, recover_path, recover_steps, recover_epochs,
                                          recover_lr, eval_path, recover_top)
    except RewriteError as e:
        raise click.UsageError(str(e))
    click.echo(json.dumps(report))


def test_cli_options_run_recovery(world):
    d, teacher, *_ = world
    rewrite.save(teacher, d / "teacher.safetensors")
    res = CliRunner().invoke(apply_like, [str(d / "teacher.safetensors"), "--recover", str(d / "day_0.npz"),
                                          "--steps", "30", "--lr", "0.01", "--eval", str(d / "day_1.npz")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["steps"] <= 30 and out["tables"] == ["t1"] and out["lr"] == 0.01
    assert out["eval"]["logit_rmse_recovered"] < out["eval"]["logit_rmse_rewritten"]
    res = CliRunner().invoke(apply_like, [str(d / "teacher.safetensors")])
    assert res.exit_code == 0 and res.stdout.strip() == "null"


@pytest.mark.parametrize("extra, message", [
    (["--recover", "DAY0", "--steps", "5", "--epochs", "1"], "--steps and --epochs are exclusive: give one"),
    (["--recover", "DAY0", "--eval", "DAY0"], "is the --recover data: evaluate on data kept apart"),
    (["--steps", "5", "--recover-top"], "--steps, --recover-top only apply with --recover DATA"),
    (["--recover", "missing.npz"], "missing.npz: no such data file"),
])
def test_cli_option_errors(world, extra, message):
    d, teacher, *_ = world
    rewrite.save(teacher, d / "teacher.safetensors")
    args = [a.replace("DAY0", str(d / "day_0.npz")) for a in extra]
    res = CliRunner().invoke(apply_like, [str(d / "teacher.safetensors"), *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    from rewrite.recovery import MIN_LR_FRACTION, lr_factor

    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1 * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + np.cos(0))))
    assert max(f) == f[9] and all(a >= b for a, b in zip(f[9:], f[10:]))        # peak after warm-up
    assert f[50] == pytest.approx(MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(MIN_LR_FRACTION)



def test_derived_constant_buffers_are_not_trained(world):
    """A row-wise int4 table keeps its fp16 decode table (a non-persistent float buffer) as it
    is: trained, it once blew the held-out loss up and recovery kept its start."""
    _, teacher, _, day0, day1 = world
    student, _ = rewrite.apply(teacher, [passes.robe(compression=8, block=4, tables=("t1",)),
                                         passes.quantize(bits=4, tables=("t0", "t2"))])
    table = student.embeddings["t0"].exp_table.clone()
    rec, report = recover(teacher, student, day0, steps=80, lr=1e-2, eval_data=day1)
    assert torch.equal(rec.embeddings["t0"].exp_table, table)
    assert "embeddings.t0.packed" in report.frozen and report.best_step > 0
    assert report.eval["logit_rmse_recovered"] < report.eval["logit_rmse_rewritten"]


def test_integer_only_tables_are_a_result_not_an_error(world):
    _, teacher, _, day0, _ = world
    student, _ = rewrite.apply(teacher, [passes.quantize(bits=4, tables=("t0", "t2"))])
    same, report = recover(teacher, student, day0)
    assert same is student and report.steps == 0 and report.tables == ["t0", "t2"]
    assert report.frozen == ["embeddings.t0.packed", "embeddings.t2.packed"]
    assert report.skipped.startswith("the rewritten tables hold no float tensor to train")


def test_a_training_form_trains_in_place_of_the_stored_form_at_its_own_rate(world):
    """mdq's codes are integers: recovery trains its training form (fp32 E, rounded in the
    forward) at lr · lr_scale and returns the stored form; other tables keep the full rate."""
    from passes.md_quantized import MDQBag, MDQTraining
    from rewrite.recovery import _lr_scales, _student

    _, teacher, student, day0, _ = world
    mixed, _ = rewrite.apply(teacher, [passes.mdq(bits=4, inner_dim=2, tables=("t1",))])
    mixed = mixed.with_tables({"t0": student.embeddings["t0"]})            # robe: no training form
    trained = _student(teacher, mixed, ["t0", "t1"], False)
    assert isinstance(trained.embeddings["t1"], MDQTraining)
    scales = _lr_scales(trained, ["t0", "t1"])
    assert set(scales) == {f"embeddings.t1.{n}" for n in ("weight", "scale", "bias", "proj")}
    assert set(scales.values()) == {MDQTraining.lr_scale} and MDQTraining.lr_scale == 0.1
    rec, report = recover(teacher, mixed, day0, steps=30, lr=1e-1)
    assert isinstance(rec.embeddings["t1"], MDQBag) and report.steps == 30
    assert not any(n.startswith("embeddings.t1.") for n in report.frozen)     # the codes trained (as E)
    assert rec.embeddings["t1"].num_bytes() == mixed.embeddings["t1"].num_bytes()
