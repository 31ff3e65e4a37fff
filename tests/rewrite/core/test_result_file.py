"""``ResultFile``: tensors placed while a run goes on are written once, where they are; the file
is valid safetensors holding the model; anything else falls back to the byte-exact writer."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open

import rewrite
from rewrite.core import mapped
from rewrite.core.result_file import HEADER_SPACE, ResultFile


def header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def assert_holds(path, model):
    back = rewrite.load(path)
    assert back.full_spec() == model.full_spec()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def big_model(make_dlrm):
    return make_dlrm(rows=(3, 40_000, 50, 30_000), dim=16)        # t1, t3: 2.6 and 1.9 MB


def place_tables(model, result: ResultFile, *tables: str):
    for t in tables:
        assert mapped.spill(model.embeddings[t], into=result) > 0
        assert mapped.is_mapped(model.embeddings[t].weight)


def test_placed_tables_stay_where_they_were_written(tmp_path, make_dlrm):
    model = big_model(make_dlrm)
    target = tmp_path / "out.safetensors"
    with ResultFile(target) as result:
        place_tables(model, result, "t3", "t1")
        weight = model.embeddings["t3"].weight.detach().clone()
        result.finish(model)
    assert header_length(target) == HEADER_SPACE - 8
    with safe_open(str(target), "pt") as f:
        assert torch.equal(f.get_tensor("embeddings.t3.weight"), weight)
    with open(target, "rb") as f:                  # t3 first, at the start of the data: not copied
        f.seek(HEADER_SPACE)
        assert f.read(64) == weight.reshape(-1)[:16].numpy().tobytes()
    assert_holds(target, model)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_a_placed_tensor_the_model_no_longer_holds_falls_back_to_the_exact_writer(tmp_path, make_dlrm):
    model = big_model(make_dlrm)
    with ResultFile(tmp_path / "out.safetensors") as result:
        place_tables(model, result, "t1", "t3")
        model.embeddings["t1"].weight = torch.nn.Parameter(model.embeddings["t1"].weight + 1)  # a hole
        result.finish(model)
    rewrite.save(model, tmp_path / "exact.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "exact.safetensors").read_bytes()


def test_the_last_placed_tensor_replaced_is_cut_off(tmp_path, make_dlrm):
    model = big_model(make_dlrm)
    with ResultFile(tmp_path / "out.safetensors") as result:
        place_tables(model, result, "t1", "t3")
        model.embeddings["t3"].weight = torch.nn.Parameter(model.embeddings["t3"].weight * 2)
        result.finish(model)
    assert header_length(tmp_path / "out.safetensors") == HEADER_SPACE - 8
    assert_holds(tmp_path / "out.safetensors", model)


def test_nothing_placed_is_the_exact_writer(tmp_path, small_dlrm):
    with ResultFile(tmp_path / "out.safetensors") as result:
        result.finish(small_dlrm)
    rewrite.save(small_dlrm, tmp_path / "exact.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "exact.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact.safetensors", "out.safetensors"]


def test_a_tensor_whose_size_does_not_divide_the_offset_is_not_placed(tmp_path):
    with ResultFile(tmp_path / "out.safetensors") as result:
        assert result.place(torch.ones(3, dtype=torch.uint8)) is not None
        assert result.place(torch.ones(4, dtype=torch.float32)) is None
        assert result.place(torch.ones(5, dtype=torch.uint8)) is not None
        assert torch.equal(result.place(torch.arange(4, dtype=torch.float32)), torch.arange(4, dtype=torch.float32))


def test_an_unfinished_result_leaves_nothing_and_the_target_untouched(tmp_path, make_dlrm):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"the previous file")
    model = big_model(make_dlrm)
    with pytest.raises(RuntimeError, match="fit failed"):
        with ResultFile(target) as result:
            place_tables(model, result, "t1")
            raise RuntimeError("fit failed")
    assert target.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_apply_writes_spilled_tables_once_into_the_output(tmp_path, make_dlrm):
    """``rewrite apply`` of a file (tables mapped): the int4 tables spilled during the fit are the
    output's, and the file holds what the in-memory rewrite holds."""
    from click.testing import CliRunner

    import passes
    from rewrite.cli import main
    from rewrite.pass_manager import apply

    model = make_dlrm(rows=(3, 100_000, 50, 120_000), dim=16)     # int4: 1.2 and 1.44 MB, spilled
    rewrite.save(model, tmp_path / "m.safetensors")
    run = CliRunner().invoke(main, ["apply", str(tmp_path / "m.safetensors"), "-p", "quantize:bits=4",
                                    "-o", str(tmp_path / "q4.safetensors")])
    assert run.exit_code == 0, run.output
    assert header_length(tmp_path / "q4.safetensors") == HEADER_SPACE - 8
    in_memory, _ = apply(model, [passes.quantize(bits=4)])
    assert_holds(tmp_path / "q4.safetensors", in_memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "q4.safetensors"]


def test_tables_left_as_they_were_are_copied_with_their_pages_handed_back(tmp_path, make_dlrm):
    """The tensors not placed (here a table mapped from the input, untouched) are written in
    blocks whose source pages are released, as ``save`` writes them: not faulted in and kept."""
    from tests.rewrite.core.test_mapped import resident_bytes

    source = tmp_path / "in.safetensors"
    rewrite.save(make_dlrm(rows=(3, 40_000, 50, 300_000), dim=16), source)     # t3: 19 MB
    model = rewrite.load(source)
    model.embeddings["t1"].weight = torch.nn.Parameter(model.embeddings["t1"].weight.detach() * 2)
    with ResultFile(tmp_path / "out.safetensors") as result:
        place_tables(model, result, "t1")
        result.finish(model)
    assert header_length(tmp_path / "out.safetensors") == HEADER_SPACE - 8
    assert resident_bytes(source) < 4 << 20
    assert_holds(tmp_path / "out.safetensors", model)
