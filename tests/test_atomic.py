"""`hpcbrain.atomic`: the new content or the old, never half, and no temporary file left."""
from __future__ import annotations

import pytest

from hpcbrain.atomic import atomic_write, write_text_atomic


def test_replaces_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_text_atomic(path, "old")
    with atomic_write(path, "w") as handle:
        handle.write("new ")
        handle.write("content")
    assert path.read_text() == "new content"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "latents.csv"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "w") as handle:
            handle.write("half of the n")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["latents.csv"]


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
