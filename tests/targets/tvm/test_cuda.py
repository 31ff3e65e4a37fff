"""tvm-cuda: the composite model builds to a library + sm_80 cubin here; running needs a GPU."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from rewrite.core.errors import RewriteError
from targets.base import get_target
from rewrite.core.batch import split_bags_np
from targets.tvm.common import LIBRARY, PARAMS
from targets.tvm.cuda import CUBIN, _PREBUILT, _serve_prebuilt, gpu_arch
from tests.targets.tvm.models import BATCHES, batch, composite_model
from tests.tolerances import assert_close

EM_CUDA = 190           # ELF e_machine of NVIDIA cubins (elf.h)
HAS_GPU = gpu_arch() is not None


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return composite_model()


@pytest.fixture(scope="module")
def compiled(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm_cuda")
    arch = gpu_arch() or "sm_80"
    return out, get_target("tvm-cuda").lower(model, batch(model, "b1-ragged"), out, arch=arch)


def cubin_arch(data: bytes) -> int:
    """SM number of a cubin: e_flags bits 0-7 (ELF ABI version < 8) or 8-15 (CUDA 12.8+, v8)."""
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 18)[0] == EM_CUDA
    flags = struct.unpack_from("<I", data, 48)[0]
    return (flags >> 8) & 0xFF if data[8] >= 8 else flags & 0xFF


@pytest.mark.slow
def test_builds_library_and_cubin_for_the_arch(compiled):
    out, path = compiled
    assert path.files == [LIBRARY, PARAMS, CUBIN]
    assert all((out / f).stat().st_size > 0 for f in path.files)
    assert cubin_arch((out / CUBIN).read_bytes()) == int(path.options["arch"][3:])
    assert len(path.options["cuda_source_sha256"]) == 64


def test_load_serves_the_prebuilt_cubin_for_its_source():
    import tvm_ffi

    source = "extern \"C\" __global__ void k() {}"
    _PREBUILT[hashlib.sha256(source.encode()).hexdigest()] = b"CUBIN-BYTES"
    _serve_prebuilt()
    assert bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source)) == b"CUBIN-BYTES"


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_unavailable_without_a_gpu(compiled):
    target = get_target("tvm-cuda")
    assert target.unavailable().startswith("no CUDA device")
    out, path = compiled
    with pytest.raises(RewriteError, match="tvm-cuda: cannot run here: no CUDA device"):
        target.load(out, path)


def test_bad_arch_is_refused(model, tmp_path):
    with pytest.raises(RewriteError, match="tvm-cuda: arch must look like sm_80.*'ampere'"):
        get_target("tvm-cuda").lower(model, batch(model, "b1-ragged"), tmp_path, arch="ampere")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(BATCHES))
def test_matches_torch_on_the_gpu(model, compiled, name):
    out, path = compiled
    run = get_target("tvm-cuda").load(out, path)
    b = batch(model, name)
    with torch.no_grad():
        ref = model(*b.inputs()).numpy()
    got = run(b.dense.numpy(), split_bags_np(b.indices.numpy(), b.offsets.numpy(),
                                             len(model.spec.features)))
    assert_close(got, ref, "compiled-fp32-logits", name)
