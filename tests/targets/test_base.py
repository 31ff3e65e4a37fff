import numpy as np
import pytest
import torch

from rewrite.core.errors import RewriteError
from rewrite.core.synthetic import multi_hot_batch
from targets.base import TARGETS, export_program, get_target, register_target
from rewrite.core.batch import split_bags_np
from tests.representations import composite_model


def test_split_bags_np_matches_the_models_split():
    from rewrite.core.model import split_bags

    b = multi_hot_batch([10, 20, 30], 5, 2, 2.0, 0, empty_fraction=0.3)
    got = split_bags_np(b.indices.numpy(), b.offsets.numpy(), 3)
    want = split_bags(b.indices, b.offsets, 3)
    assert len(got) == 6
    for g, w in zip(got, want):
        assert g.dtype == np.int64 and np.array_equal(g, w.numpy())
    assert all(got[2 * f + 1][0] == 0 for f in range(3))


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(RewriteError, match=r"unknown target 'tvm-gpu' \(known: fbgemm-int8, onnx-cpu"):
        get_target("tvm-gpu")


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_target("onnx-cpu")(type("Dup", (), {}))
    assert TARGETS["onnx-cpu"].__name__ == "OnnxCpu"


def test_exported_program_serves_batch_one_and_empty_features():
    """Without backed_size_oblivious, torch.export guards B >= 3 (offsets[1:-1] contiguity)."""
    model = composite_model()
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    program = export_program(model, multi_hot_batch(rows, 8, 5, 2.0, 0)).module()
    for b, mean, empty in ((1, 2.0, 0.0), (2, 0.0, 1.0)):
        batch = multi_hot_batch(rows, b, 5, mean, 1, empty_fraction=empty)
        bags = [torch.from_numpy(x) for x in split_bags_np(batch.indices.numpy(), batch.offsets.numpy(),
                                                          len(rows))]
        torch.testing.assert_close(program(batch.dense, *bags), model(*batch.inputs()))


def test_native_code_compiled_for_a_higher_tier_is_refused_by_name(monkeypatch):
    from rewrite.core import isa
    from targets.base import CompiledPath, require_tier

    tvm, eager = get_target("tvm-llvm"), get_target("torch")
    assert tvm.native_code and not eager.native_code
    monkeypatch.setenv(isa.ENV, "generic")
    compiled = CompiledPath("tvm-llvm", ["lib.so"], {"isa_tier": "avx2"})
    with pytest.raises(RewriteError, match="compiled for ISA tier 'avx2'; this host runs 'generic'"):
        require_tier(tvm, compiled)
    require_tier(tvm, CompiledPath("tvm-llvm", ["lib.so"], {"isa_tier": "generic"}))
    require_tier(eager, compiled)                   # no machine code in the files: nothing to refuse
