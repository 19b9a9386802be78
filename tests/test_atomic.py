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


def test_a_temporary_file_left_by_a_killed_writer_goes_with_the_next_write(tmp_path):
    """SIGKILL mid-write leaves `.NAME.tmp-HOST-PID`; the next write of NAME removes it when
    its process (on this host) is gone, and another host's only once it is a day old."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from hpcbrain import atomic

    target = tmp_path / "result.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    ours = tmp_path / f".result.json.tmp-{socket.gethostname()}-{gone}"
    fresh_elsewhere = tmp_path / ".result.json.tmp-node-b-4242"
    old_elsewhere = tmp_path / ".result.json.tmp-node-c-4242"
    other_file = tmp_path / f".other.json.tmp-{socket.gethostname()}-{gone}"
    for path in (ours, fresh_elsewhere, old_elsewhere, other_file):
        path.write_text("half")
    a_day_ago = time.time() - atomic.STALE_TEMP_S - 60
    os.utime(old_elsewhere, (a_day_ago, a_day_ago))
    atomic.write_text_atomic(target, "{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([fresh_elsewhere.name, other_file.name, "result.json"])
