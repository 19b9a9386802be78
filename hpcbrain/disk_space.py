"""A full file system (or a quota) said in one line a person can act on: which file was being
written, what it was, how much is free there and about how much more is needed.

    raise OutOfSpace.from_error(exc, path, "a checkpoint")    # where the write failed
    if (full := out_of_space(exc)) is not None: print(full)   # at the top, for any error

Writes reach the disk through Python (`OSError` errno ENOSPC / EDQUOT) and through libraries
that wrap it (torch.save raises `RuntimeError("... unexpected pos ...")` with the OSError as its
context; zarr re-raises it), so the error's whole chain is searched.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

__all__ = ["OutOfSpace", "out_of_space", "no_space_error", "EXIT_NO_SPACE"]

#: sysexits' EX_IOERR: an input/output error; here the file system is full
EXIT_NO_SPACE = 74
_FULL = (errno.ENOSPC, errno.EDQUOT)


def no_space_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT `OSError` in `exc`'s chain of causes and contexts, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _size_of_its_kind(path: Path) -> int | None:
    """About how big the file being written would have been: the file it replaces or the
    largest sibling with the same suffix (the previous checkpoint, the other shard files)."""
    sizes = []
    try:
        sizes = [p.stat().st_size for p in path.parent.glob(f"*{path.suffix}")
                 if p.is_file()] if path.suffix else []
    except OSError:
        pass
    return max(sizes) if sizes else None


class OutOfSpace(OSError):
    """The file system holding `path` is full (or the user's quota there is used up)."""

    def __init__(self, path: str | Path, what: str, needed_bytes: int | None = None):
        self.path, self.what = Path(path), what
        self.free_bytes = _free_bytes(self.path)
        self.needed_bytes = needed_bytes
        free = "?" if self.free_bytes is None else _size(self.free_bytes)
        need = (f"about {_size(needed_bytes)} more is needed for it"
                if needed_bytes else "how much more is needed is not known")
        super().__init__(
            errno.ENOSPC,
            f"out of disk space writing {what} {self.path}: its file system has {free} free "
            f"and {need}. Nothing half-written is kept; free space there (or quota) and run "
            f"the same command again: it goes on from what is complete")

    def __str__(self) -> str:
        return self.strerror

    @classmethod
    def from_error(cls, exc: BaseException, path: str | Path, what: str) -> "OutOfSpace":
        """For a write of `what` to `path` that failed with `exc` (an out-of-space error; its
        own file name may be a temporary one, `path` is what a person knows)."""
        return cls(Path(path), what, _size_of_its_kind(Path(path)))


def out_of_space(exc: BaseException) -> OutOfSpace | None:
    """`exc` as an `OutOfSpace` when a full file system is behind it (named where it was
    raised, else from the failing file's name), else None."""
    if isinstance(exc, OutOfSpace):
        return exc
    full = no_space_error(exc)
    if full is None:
        return None
    for cause in (exc.__cause__, exc.__context__):
        if isinstance(cause, OutOfSpace):
            return cause
    path = Path(full.filename) if full.filename else Path(".")
    return OutOfSpace(path, "a file", _size_of_its_kind(path) if full.filename else None)
