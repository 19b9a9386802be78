"""One owner per run folder: an exclusive lock that a second job on the same folder meets at once.

    with run_folder_lock(run_dir):      # every rank calls it; global rank 0 holds the lock
        train ...

The lock is `fcntl.flock` on RUN_DIR/.lock, which the kernel releases when its process dies
(a crash, a SIGKILL, a preemption): a requeued job finds it free. The file records who holds it
(host, pid, start time), so a refused second job names the holder; a record left by a process
that is gone is taken over with a warning. With several ranks only global rank 0 locks, and the
outcome is broadcast so every rank stops alike instead of waiting in a collective.

`file_lock(path, what, advice)` is the same lock on any file, for one process (a conversion's
``OUT.partial.lock``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from hpcbrain import dist

__all__ = ["RunFolderLocked", "run_folder_lock", "file_lock", "LOCK_FILE"]

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, what: str, advice: str):
    """The open, locked file `path`; RunFolderLocked naming `what`, the holder and `advice`
    when another process has it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            handle.close()
            raise RunFolderLocked(
                f"{what} is in use by {holder.get('host', '?')} pid {holder.get('pid', '?')} "
                f"(since {holder.get('since', '?')}): {advice}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()       # the holder removed the file as we opened it: lock the new one
    previous = _holder(path)
    if previous and (previous.get("host"), previous.get("pid")) != (socket.gethostname(),
                                                                     os.getpid()):
        log.warning("%s: taking over the lock record of %s pid %s, which no longer holds it "
                    "(it ended without releasing: crashed, killed or preempted)", what,
                    previous.get("host", "?"), previous.get("pid", "?"))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    handle.flush()
    return handle


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for the block (see the module doc). A collective with a group."""
    with contextlib.ExitStack() as held:
        refusal = None
        if dist.is_global_rank0():
            try:
                # the lock file stays (the run folder is its home); its record is cleared
                held.enter_context(file_lock(
                    Path(run_dir) / LOCK_FILE, str(run_dir),
                    "two jobs must not share a run folder. Wait for it to finish, or pass "
                    "another run.name", remove=False))
            except RunFolderLocked as exc:
                refusal = str(exc)
        refusal = dist.broadcast_object(refusal)
        if refusal:
            raise RunFolderLocked(refusal)
        yield


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, advice: str, remove: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, in this process alone; RunFolderLocked
    names `what`, the holder and `advice` when another live process holds it. With `remove`
    the file goes when the block ends (a process that opened it meanwhile notices and retries
    on a fresh file)."""
    path = Path(path)
    handle = _acquire(path, what, advice)
    try:
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        else:
            handle.seek(0)
            handle.truncate()        # no record: the next owner has nothing to take over
        handle.close()               # closing releases the flock
