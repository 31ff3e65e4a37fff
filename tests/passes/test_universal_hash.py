"""Universal hashing: exact against Python big integers (no int64 overflow), identical in ONNX
Runtime and TVM."""

import numpy as np
import pytest
import torch

from passes.universal_hash import PRIME, hash_coefficients, reference_hash, universal_hash

# ids across the int64 range: small, around p, 2^40 (the brief's bound), up to the largest int64
IDS = [0, 1, 2, PRIME - 1, PRIME, PRIME + 1, 2 * PRIME, 2**40 + 17, 2**40 * 3 + 5, 2**53 + 1,
       2**62 + 5, 2**63 - 1]
BUCKETS = 1_000_003


class HashModule(torch.nn.Module):
    def __init__(self, k: int = 6, m: int = BUCKETS):
        super().__init__()
        a, b = hash_coefficients(k, seed=3)
        a[0], b[0] = PRIME - 1, PRIME - 1          # the largest coefficients: a·x + b is maximal
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.m = m

    def forward(self, x):
        return universal_hash(x, self.a, self.b, self.m)


def ids_tensor():
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 2**62, 200, dtype=np.int64)
    return torch.tensor(IDS + extra.tolist(), dtype=torch.int64)


def test_exact_against_big_integers_without_overflow():
    mod, x = HashModule(), ids_tensor()
    got = mod(x)
    a, b = mod.a.tolist(), mod.b.tolist()
    want = [[reference_hash(v, a[j], b[j], BUCKETS) for j in range(len(a))] for v in x.tolist()]
    assert got.dtype == torch.int64
    assert got.tolist() == want
    assert int(got.min()) >= 0 and int(got.max()) < BUCKETS
    # the reduction matters: without x mod p first, a·x would overflow int64 for these ids
    assert (PRIME - 1) * (PRIME - 1) + PRIME - 1 < 2**63 - 1 < (PRIME - 1) * 2**40


def test_coefficients_in_range_and_seeded():
    a, b = hash_coefficients(1000, seed=5)
    assert int(a.min()) >= 1 and int(a.max()) < PRIME and int(b.min()) >= 0 and int(b.max()) < PRIME
    a2, b2 = hash_coefficients(1000, seed=5)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, hash_coefficients(1000, seed=6)[0])


def test_no_hash_functions_is_an_error():
    with pytest.raises(ValueError, match="at least one hash function, got k=0"):
        hash_coefficients(0, seed=0)


def test_buckets_are_close_to_uniform():
    x = torch.arange(200_000, dtype=torch.int64)
    h = universal_hash(x, *hash_coefficients(1, seed=1), 100).squeeze(1)
    counts = torch.bincount(h, minlength=100).double()
    assert float(counts.std() / counts.mean()) < 0.05      # 2000 per bucket: ~2% by chance


@pytest.mark.slow
def test_identical_in_onnxruntime():
    import onnxruntime as ort

    mod, x = HashModule().eval(), ids_tensor()
    onx = torch.onnx.export(mod, (x[:5],), dynamo=True, verbose=False,
                            dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, mod(x).numpy())


@pytest.mark.slow
def test_identical_in_tvm():
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod, x = HashModule(), ids_tensor()
    ep = torch.export.export(mod, (x[:5],), dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    ex = tvm.compile(from_exported_program(ep), tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_array_equal(out.numpy(), mod(x).numpy())
