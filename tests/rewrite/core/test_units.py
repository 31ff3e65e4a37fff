"""Byte sizes as people write them."""

from __future__ import annotations

import pytest

from rewrite.core.errors import RewriteError
from rewrite.core.units import parse_bytes


@pytest.mark.parametrize("text, expected", [("4096", 4096), ("256KiB", 256 * 1024), ("64MB", 64 * 10**6),
                                            ("1.5GiB", 3 * 2**29), (" 2 kb ", 2000), ("10B", 10)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-5MB", "MB", ""])
def test_unreadable_sizes(text):
    with pytest.raises(RewriteError, match="as a byte size"):
        parse_bytes(text)
