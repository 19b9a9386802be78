"""One way to write a file so that readers see the old content or the new, never half of it.

    with atomic_write(path, "w", newline="") as handle:    # csv, text, or "wb" for torch.save
        ...
    write_text_atomic(path, text)

The data goes to a hidden temporary file beside `path` (same file system, so the rename is
atomic), is flushed and fsynced, then renamed over `path`; the folder is fsynced so the rename
survives a crash. On any error the temporary file is removed and `path` is left as it was.
A process killed mid-write (SIGKILL: no cleanup runs) leaves its temporary file; the next write
of the same `path` removes it — at once when its writer was a process of this host that is
gone, after `STALE_TEMP_S` when it was another host's (whose processes cannot be asked).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import IO, Iterator

from hpcbrain.disk_space import OutOfSpace, no_space_error

__all__ = ["atomic_write", "write_text_atomic"]

#: a temporary file another host left is taken for abandoned after this long untouched
STALE_TEMP_S = 24 * 3600.0
_HOST = socket.gethostname()


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # someone else's process: alive
        return True
    return True


def _remove_abandoned_temps(path: Path) -> None:
    """The temporary files of `path` that writers killed mid-write left behind."""
    prefix = f".{path.name}.tmp-"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for temp in candidates:
        host, _, pid = temp.name[len(prefix):].rpartition("-")
        try:
            if host == _HOST or not host:     # ours, or the old name without a host
                abandoned = pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
            else:
                abandoned = time.time() - temp.stat().st_mtime > STALE_TEMP_S
            if abandoned:
                temp.unlink()
        except OSError:                  # gone already, or not ours to remove
            continue


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
    _remove_abandoned_temps(path)
    tmp = _temp_name(path)
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
