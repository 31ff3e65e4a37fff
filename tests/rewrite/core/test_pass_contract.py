"""The ``-p NAME[:key=value]...`` grammar, option coercion and validation, the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

import passes
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import (PASSES, PassContext, Rewrite, Selection, configure, option, option_rows,
                               parse_pass, register_pass)
from tests.pass_helpers import profile_of, small_model


@dataclass(frozen=True)
class NestedConfig(Selection):
    mode: Literal["a", "b"] = option("a", "a literal")
    ratio: float = option(0.5, "a float")
    flag: bool = option(False, "a bool")
    names: tuple[str, ...] = option((), "a list")
    limit: int | None = option(None, "an optional int")
    inner: str = option("", "a nested pass spec", rest=True)


@pytest.fixture
def nested_pass():
    @register_pass("_nested_test", NestedConfig)
    def run(site, cfg, ctx):
        """A test pass."""
        return Rewrite(site.module(ctx.model))

    yield "_nested_test"
    del PASSES["_nested_test"]


def test_lists_bools_literals_optionals(nested_pass):
    cp = parse_pass("_nested_test:mode=b:ratio=2:flag=yes:names=x,y,z:limit=7:tables=t1,t2:min_rows=1e3")
    c = cp.config
    assert (c.mode, c.ratio, c.flag, c.names, c.limit, c.tables, c.min_rows) == \
        ("b", 2.0, True, ("x", "y", "z"), 7, ("t1", "t2"), 1000)
    assert parse_pass("_nested_test:flag=off:limit=none").config.flag is False
    assert parse_pass("_nested_test:limit=none").config.limit is None


def test_nested_rest_field_takes_the_rest_of_the_text(nested_pass):
    cp = parse_pass("_nested_test:ratio=0.25:inner=quantize:bits=4:min_rows=10")
    assert cp.config.ratio == 0.25
    assert cp.config.inner == "quantize:bits=4:min_rows=10"
    assert parse_pass(cp.config.inner).config.bits == 4


def test_str_round_trips_non_default_options(nested_pass):
    cp = parse_pass("_nested_test:mode=b:flag=true:names=p,q")
    assert str(cp) == "_nested_test:mode=b:flag=true:names=p,q"
    assert parse_pass(str(cp)) == cp
    assert str(passes.quantize(bits=4, tables=["t1", "t2"])) == "quantize:bits=4:tables=t1,t2"


def test_python_and_cli_build_the_same_pass():
    assert passes.md(energy=0.9, tables="t3,t8") == parse_pass("md:energy=0.9:tables=t3,t8")
    assert passes.qr(collisions=8, op="add") == parse_pass("qr:collisions=8:op=add")
    assert passes.hash() == parse_pass("hash")


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown pass 'nope' (known: dhe, hash, hot-cold, hybrid, md, mdq, memrec, onehot, prune-dims, qr, quantize, robe, tt; `rewrite passes` lists them)"),
    ("quantize:bitz=4", "pass quantize: unknown option 'bitz' (options: bits, compression, min_rows, tables)"),
    ("quantize:bits", "pass quantize: cannot read 'bits'; options are key=value separated by ':' "
                      "(e.g. -p quantize:bits=4:min_rows=1000)"),
    ("quantize:=4", "pass quantize: cannot read '=4'"),
    ("quantize:bits=five", "pass quantize: option bits='five': must be one of 16, 8, 4, 2"),
    ("quantize:min_rows=1.5", "pass quantize: option min_rows='1.5': must be a whole number"),
    ("md:energy=high", "pass md: option energy='high': must be a number"),
    ("md:round_pow2=2", "pass md: option round_pow2='2': must be true or false"),
])
def test_bad_specs(spec, message):
    with pytest.raises(RewriteError) as e:
        parse_pass(spec)
    assert str(e.value).startswith(message)


def test_python_values_are_type_checked():
    with pytest.raises(RewriteError, match=r"pass qr: option collisions=2.5: must be int"):
        passes.qr(collisions=2.5)
    with pytest.raises(RewriteError, match=r"pass md: option round_pow2=1: must be bool"):
        passes.md(round_pow2=1)
    assert passes.md(energy=1).config.energy == 1


def test_register_pass_contract():
    @dataclass
    class Loose:
        x: int = 1

    with pytest.raises(TypeError, match="config must be a frozen dataclass"):
        register_pass("_loose", Loose)

    @dataclass(frozen=True)
    class Unselected:
        x: int = 1

    with pytest.raises(TypeError, match="config must inherit Selection"):
        register_pass("_unselected", Unselected)
    with pytest.raises(ValueError, match="pass 'quantize' registered twice"):
        register_pass("quantize", NestedConfig)(lambda *a: None)


def test_option_rows_and_touches():
    rows = {r[0]: r for r in option_rows(configure("qr").info)}
    assert rows["min_rows"][1:3] == ("int", "201")
    assert rows["op"][1:3] == ("mult|add|concat", "mult")
    assert rows["tables"][1:3] == ("list of str", "")
    assert "dlrm" in rows["min_rows"][3]
    assert configure("qr").config.touches() == "tables with at least 201 rows"
    assert configure("quantize").config.touches() == "every table"
    assert configure("onehot").config.touches() == "tables with at most 128 rows"
    assert configure("qr", tables="t1").config.touches() == "tables t1 with at least 201 rows"


def test_context_weights_and_lookups():
    model = small_model()
    counts = np.zeros(1000, dtype=np.int64)
    counts[:10] = 99
    ctx = PassContext(model, profile_of(model, {"t3": counts}, samples=495), [])
    w = ctx.row_weights("t3", 1000)
    assert w.mean() == pytest.approx(1.0) and w[0] / w[500] == pytest.approx(100.0)
    assert ctx.lookups_per_sample("t3") == pytest.approx(2.0)
    bare = PassContext(model, None, [])
    assert bare.lookups_per_sample("t3") is None and np.all(bare.row_weights("t3", 1000) == 1)
