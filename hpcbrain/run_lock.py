"""One owner per run folder: an exclusive lock that a second job on the same folder meets at once.

    with run_folder_lock(run_dir):      # every rank calls it; global rank 0 holds the lock
        train ...

The lock is `fcntl.flock` on RUN_DIR/.lock, which the kernel releases when its process dies
(a crash, a SIGKILL, a preemption): a requeued job finds it free. The file records who holds it
(host, pid, start time), so a refused second job names the holder; a record left by a process
that is gone is taken over with a warning. With several ranks only global rank 0 locks, and the
outcome is broadcast so every rank stops alike instead of waiting in a collective.

Across hosts flock is only as good as the shared file system's locking (NFSv4 and Lustre mounted
with `flock` lock cluster-wide; `localflock` or an NFS without its lock manager lock per host).
So the holder also beats: a thread rewrites the record's `beat` (wall-clock seconds) every
`BEAT_S`. A process that gets the flock but finds another host's record watches that beat: if it
moves, the holder is alive and the lock is refused; if it is older than `STALE_S` (the holder
died without releasing: node lost, SIGKILL), the record is taken over with a warning. A record on
this host needs no beat: the kernel's flock already says whether its process is alive.

`file_lock(path, what, advice)` is the same lock on any file, for one process (a conversion's
``OUT.partial.lock``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import IO, Iterator

from hpcbrain import dist

__all__ = ["RunFolderLocked", "run_folder_lock", "file_lock", "LOCK_FILE"]

LOCK_FILE = ".lock"
#: how often a holder rewrites its record's beat, and how old another host's beat must be before
#: its lock is taken over (several missed beats: a busy file system delays a write by seconds)
BEAT_S = 10.0
STALE_S = 60.0
#: the record is written in place at this fixed size, so a reader never sees a shorter, torn one
RECORD_BYTES = 512
log = logging.getLogger(__name__)


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _refusal(what: str, holder: dict, advice: str) -> RunFolderLocked:
    return RunFolderLocked(f"{what} is in use by {holder.get('host', '?')} pid "
                           f"{holder.get('pid', '?')} (since {holder.get('since', '?')}): {advice}")


def _another_host_alive(path: Path, record: dict) -> bool:
    """Whether the record of a holder on another host still beats: watched until its beat moves
    (alive) or is STALE_S old (gone)."""
    told = False
    while True:
        beat = record.get("beat")
        if not isinstance(beat, (int, float)) or time.time() - beat >= STALE_S:
            return False
        if not told:
            log.info("%s is recorded as held by %s pid %s: watching its heartbeat (at most "
                     "%g s) to tell whether it is alive", path, record.get("host", "?"),
                     record.get("pid", "?"), STALE_S)
            told = True
        time.sleep(min(BEAT_S / 2, max(0.0, beat + STALE_S - time.time())))
        now = _holder(path)
        if (now.get("host"), now.get("pid")) != (record.get("host"), record.get("pid")):
            return bool(now)    # replaced by yet another holder, or released
        if now.get("beat") != beat:
            return True
        record = now


def _write_record(handle: IO, record: dict) -> None:
    data = json.dumps(record).encode().ljust(RECORD_BYTES)
    os.pwrite(handle.fileno(), data, 0)
    os.fsync(handle.fileno())


class _Heartbeat:
    """Rewrites the holder's record with a fresh beat every BEAT_S until stopped."""

    def __init__(self, handle: IO, record: dict):
        self.handle, self.record = handle, record
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lock-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(BEAT_S):
            try:
                _write_record(self.handle, {**self.record, "beat": time.time()})
            except (OSError, ValueError):   # a full or vanished file system: the flock holds
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _acquire(path: Path, what: str, advice: str) -> tuple[IO, _Heartbeat]:
    """The open, locked file `path` and its heartbeat; RunFolderLocked naming `what`, the
    holder and `advice` when another live process has it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    me = (socket.gethostname(), os.getpid())
    while True:
        # not "a+": pwrite on an O_APPEND file appends on Linux instead of writing in place
        handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            handle.close()
            raise _refusal(what, holder, advice) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()       # the holder removed the file as we opened it: lock the new one
    previous = _holder(path)
    if previous and (previous.get("host"), previous.get("pid")) != me:
        if previous.get("host") != me[0] and _another_host_alive(path, previous):
            handle.close()   # its flock did not reach us (a per-host lock), its beat did
            raise _refusal(what, previous, advice)
        log.warning("%s: taking over the lock record of %s pid %s, which no longer holds it "
                    "(it ended without releasing: crashed, killed, preempted or its node lost)",
                    what, previous.get("host", "?"), previous.get("pid", "?"))
    record = {"host": me[0], "pid": me[1], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    handle.truncate(0)
    _write_record(handle, {**record, "beat": time.time()})
    return handle, _Heartbeat(handle, record)


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
    handle, heartbeat = _acquire(path, what, advice)
    try:
        yield
    finally:
        heartbeat.stop()
        if remove:
            path.unlink(missing_ok=True)
        else:
            handle.truncate(0)       # no record: the next owner has nothing to take over
        handle.close()               # closing releases the flock
