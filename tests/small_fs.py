"""A real, size-limited file system for tests that need a disk to fill: a tmpfs mounted for the
test (root needed: skipped elsewhere, a failure under CI, which runs as root)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_file_system(size_mb: int):
    folder = Path(f"/tmp/hpcbrain-full-{uuid.uuid4().hex[:8]}")
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        folder.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs under CI: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """A ballast file that takes all the free space of `folder`'s file system but
    `leave_bytes`."""
    ballast = folder / "ballast"
    free = shutil.disk_usage(folder).free - leave_bytes
    with open(ballast, "wb") as handle:
        chunk = b"\0" * (1 << 20)
        while free > 0:
            try:
                free -= handle.write(chunk[:min(len(chunk), free)])
            except OSError:
                break
    return ballast
