"""One way to write a file so that readers see the old content or the new, never half of it.

    with atomic_write(path, "w", newline="") as handle:    # csv, text, or "wb" for torch.save
        ...
    write_text_atomic(path, text)

The data goes to a hidden temporary file beside `path` (same file system, so the rename is
atomic), is flushed and fsynced, then renamed over `path`; the folder is fsynced so the rename
survives a crash. On any error the temporary file is removed and `path` is left as it was.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

from hpcbrain.disk_space import OutOfSpace, no_space_error

__all__ = ["atomic_write", "write_text_atomic"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # some file systems do not open folders; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", what: str = "a file",
                 **open_kwargs) -> Iterator[IO]:
    """A handle on a temporary file that replaces `path` when the block ends without error.
    A full file system raises `OutOfSpace` naming `path` and `what` it is."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes whole files: mode must start with 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if no_space_error(exc) is not None:
            raise OutOfSpace.from_error(exc, path, what) from exc
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8",
                      what: str = "a file") -> Path:
    with atomic_write(path, "w", what=what, encoding=encoding) as handle:
        handle.write(text)
    return Path(path)
