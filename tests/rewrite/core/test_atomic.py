"""Atomic outputs: the target appears whole or not at all; no temporary sibling survives."""

from __future__ import annotations

import os

import pytest

from rewrite.core.atomic import atomic_path, write_text
from rewrite.core.errors import RewriteError


def test_file_written_whole(tmp_path):
    write_text(tmp_path / "a" / "b.json", "{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_failure_leaves_old_target_and_no_temp(tmp_path):
    write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out.txt"] and (tmp_path / "out.txt").read_text() == "old"


def test_directory_replaced_whole(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "stale").write_text("x")
    with atomic_path(tmp_path / "bundle", directory=True) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert os.listdir(tmp_path / "bundle") == ["manifest.json"]
    assert os.listdir(tmp_path) == ["bundle"]


def test_unwritable_target_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RewriteError, match=r"file/out\.json: cannot write here"):
        write_text(tmp_path / "file" / "out.json", "{}")
