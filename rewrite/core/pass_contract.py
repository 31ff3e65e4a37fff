"""The pass contract: registration, configs, and the ``-p NAME[:key=value]...`` grammar.

A pass is a function ``run(site, config, ctx) -> Rewrite | Skip`` of one embedding site, its
frozen-dataclass config and a ``PassContext``; it is registered once by name, and the same name
is used on the CLI (``-p quantize:bits=4``) and in Python (``passes.quantize(bits=4)``).  Table
selection (``tables=``, ``min_rows=``) is common to every pass and applied by the pass manager,
so a pass only sees the tables it was asked to rewrite.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch

from rewrite.core.batch import Batch
from rewrite.core.embedding import Representation, TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.registry import Registry
from rewrite.core.model import RecModel
from rewrite.core.access_profile import AccessProfile
from rewrite.core.tracing import EmbeddingSite


@dataclass(frozen=True)
class Rewrite:
    """A fitted replacement.  ``error_bound``: the analytic max |Δ| per output element per id in
    the bag (quantization, exact forms); None for fitted approximations, which are checked
    against the config's ``max_error`` (relative embedding error) instead."""

    representation: Representation
    error_bound: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    reason: str


def option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 (click's word)
    """A config field with its ``rewrite passes`` help text (and e.g. ``rest=True``)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class Selection:
    """Which tables a pass touches: by name, and/or by size.  Inherit in every pass config."""

    tables: tuple[str, ...] = option((), "tables to rewrite, by name (empty: every table)")
    min_rows: int = option(0, "leave tables with fewer rows alone")

    def selects(self, table: str, rows: int) -> bool:
        """Whether the pass manager hands this table to the pass."""
        return (not self.tables or table in self.tables) and rows >= self.min_rows

    def touches(self, *limits: str) -> str:
        """In words, which tables these settings hand to the pass (``limits``: a pass's own)."""
        limits = ((f"at least {self.min_rows} rows",) if self.min_rows else ()) + limits
        which = f"tables {', '.join(self.tables)}" if self.tables else ("tables" if limits else "every table")
        return which + (" with " + " and ".join(limits) if limits else "")


@dataclass
class PassContext:
    model: RecModel                   # the model as it stands before this pass (read-only)
    profile: AccessProfile | None
    sample: list[Batch]               # verification / calibration batches
    seed: int = 0

    def counts(self, table: str) -> np.ndarray | None:
        """Sampled accesses per row of ``table``, or None without a profile."""
        if self.profile is None or table not in self.profile.tables:
            return None
        return self.profile.counts(table)

    def lookups_per_sample(self, table: str) -> float | None:
        """Average ids looked up in ``table`` per sample (Ginart's k), or None without a profile."""
        c = self.counts(table)
        if c is None or not self.profile.samples:
            return None
        return float(c.sum()) / self.profile.samples

    def row_weights(self, table: str, rows: int) -> np.ndarray:
        """Per-row fitting weights, mean 1: access frequency (+1 smoothing so unseen rows still
        count a little), or uniform without a profile."""
        c = self.counts(table)
        if c is None:
            return np.ones(rows, dtype=np.float64)
        w = c.astype(np.float64) + 1.0
        return w * (rows / w.sum())


def plain_fp32_table(site: EmbeddingSite, ctx: PassContext, pass_name: str,
                     verb: str = "rewrites") -> "TableBag | Skip":
    """The site's current fp32 plain table, or the Skip a table-rewriting pass gives otherwise."""
    table = site.module(ctx.model)
    if not isinstance(table, TableBag) or table.weight.dtype != torch.float32:
        return Skip(f"{pass_name} {verb} fp32 plain tables, this is {table.describe()}")
    return table


RunFn = Callable[[EmbeddingSite, Any, PassContext], "Rewrite | Skip"]


@dataclass(frozen=True)
class PassInfo:
    name: str
    config: type
    run: RunFn

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0] if self.run.__doc__ else ""


PASSES: Registry[PassInfo] = Registry("pass", "passes", hint="; `rewrite passes` lists them")


def register_pass(name: str, config: type):
    """Decorator: register ``run`` under ``name`` with its frozen-dataclass ``config``."""
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"pass {name}: config must be a frozen dataclass")
    if not issubclass(config, Selection):
        raise TypeError(f"pass {name}: config must inherit Selection")
    return PASSES.register(name, lambda n, run: PassInfo(n, config, run))


def get_pass(name: str) -> PassInfo:
    return PASSES.get(name)


@dataclass(frozen=True)
class ConfiguredPass:
    """A pass with its config: what ``passes.quantize(bits=4)`` and ``-p quantize:bits=4`` make."""

    name: str
    config: Any

    @property
    def info(self) -> PassInfo:
        return get_pass(self.name)

    def __str__(self) -> str:
        """The ``-p`` text: the pass's own options, then the table selection (nested-pass
        options, which take the rest of the text, last of all)."""
        defaults = self.info.config()
        selection = {f.name for f in dataclasses.fields(Selection)}
        changed = [f for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != getattr(defaults, f.name)]
        changed.sort(key=lambda f: (bool(f.metadata.get("rest")), f.name in selection))
        return ":".join([self.name, *(f"{f.name}={_format(getattr(self.config, f.name))}" for f in changed)])


def configure(name: str, **options: Any) -> ConfiguredPass:
    """Build a configured pass, coercing CLI strings to the config's field types."""
    info = get_pass(name)
    hints = typing.get_type_hints(info.config)
    known = {f.name for f in dataclasses.fields(info.config)}
    values = {}
    for key, raw in options.items():
        if key not in known:
            raise RewriteError(f"pass {name}: unknown option {key!r} (options: {', '.join(sorted(known))})")
        values[key] = _coerce(name, key, raw, hints[key])
    try:
        return ConfiguredPass(name, info.config(**values))
    except (ValueError, TypeError) as e:
        raise RewriteError(f"pass {name}: {e}") from None


def parse_pass(text: str) -> ConfiguredPass:
    """``NAME[:key=value]...``; list values separated by ','.  A field whose metadata says
    ``{"rest": True}`` (a nested pass, e.g. ``cold=quantize:bits=4``) takes the rest of the text."""
    name, _, rest = text.partition(":")
    info = get_pass(name.strip())
    rest_fields = {f.name for f in dataclasses.fields(info.config) if f.metadata.get("rest")}
    options: dict[str, str] = {}
    while rest:
        item, _, tail = rest.partition(":")
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise RewriteError(f"pass {name}: cannot read {item!r}; options are key=value "
                               f"separated by ':' (e.g. -p quantize:bits=4:min_rows=1000)")
        if key in rest_fields:
            value, tail = rest[len(key) + 1:], ""
        options[key.strip()] = value.strip()
        rest = tail
    return configure(info.name, **options)


def _coerce(name: str, key: str, raw: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(raw, str):
        if origin is tuple and isinstance(raw, (list, tuple)):
            return tuple(raw)
        expected = {int: int, float: (int, float), bool: bool}.get(hint)
        if expected and (not isinstance(raw, expected) or (hint is not bool and isinstance(raw, bool))):
            raise RewriteError(f"pass {name}: option {key}={raw!r}: must be {hint.__name__}")
        return raw
    try:
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if raw.lower() in ("none", ""):
                return None
            return _coerce(name, key, raw, inner[0])
        if origin is Literal:
            for a in args:
                if str(a) == raw:
                    return a
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        if origin is tuple:
            return tuple(_coerce(name, key, v, args[0]) for v in raw.split(",") if v)
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be true or false")
        if hint is int:
            try:
                v = float(raw)
            except ValueError:
                raise ValueError("must be a whole number") from None
            if not v.is_integer():
                raise ValueError("must be a whole number")
            return int(v)
        if hint is float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError("must be a number") from None
        return raw
    except ValueError as e:
        raise RewriteError(f"pass {name}: option {key}={raw!r}: {e}") from None


def _format(v: Any) -> str:
    if v is None:
        return "none"
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)


def option_rows(info: PassInfo) -> list[tuple[str, str, str, str]]:
    """(option, type, default, help) for ``rewrite passes``."""
    hints = typing.get_type_hints(info.config)
    defaults = info.config()
    return [(f.name, _type_name(hints[f.name]), _format(getattr(defaults, f.name)), f.metadata.get("help", ""))
            for f in dataclasses.fields(info.config)]


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    return getattr(hint, "__name__", str(hint))
