"""Parsing human quantities: byte sizes ("256MB", "1.5GiB") and times ("5ms")."""

from __future__ import annotations

import re

from rewrite.core.errors import RewriteError

_BYTES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTES:
        raise RewriteError(f"cannot read {text!r} as a byte size (e.g. 512MB, 1.5GiB, 4096)")
    return int(float(m.group(1)) * _BYTES[m.group(2).lower()])


def bytes_like(value: int | float, written: str | None) -> str:
    """``value`` bytes in the unit of ``written`` (a size as the user wrote it) and exactly:
    ``bytes_like(100_000, "100KB")`` -> ``'100KB (100,000 bytes)'``; no unit -> ``'100,000 bytes'``."""
    value = int(value)
    m = re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*([a-zA-Z]*)\s*", str(written)) if written else None
    unit = m.group(1) if m else ""
    exact = f"{value:,} bytes"
    if unit.lower() in ("", "b") or unit.lower() not in _BYTES:
        return exact
    return f"{value / _BYTES[unit.lower()]:.4g}{unit} ({exact})"


def check_bytes_option(name: str, text: str | None) -> None:
    """ValueError naming the option when ``text`` (None: unset) is not a byte size: what a pass
    config's ``__post_init__`` raises (the pass manager turns it into the one-line error)."""
    if text is not None:
        try:
            parse_bytes(text)
        except RewriteError as e:
            raise ValueError(f"{name}: {e}") from None


_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_seconds(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us|µs|ns)\s*", str(text))
    if not m:
        raise RewriteError(f"cannot read {text!r} as a time (e.g. 5ms, 250us, 0.01s)")
    return float(m.group(1)) * _SECONDS[m.group(2)]
