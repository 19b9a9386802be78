"""What a test's killed process runs first: SIGKILL at its `nth` event of kind `kind`.

A subprocess script starts with `KILL_HOOKS`, after setting `kind` (str) and `nth` (int); it
counts events in `seen` and calls `event(name)` at its own points too. The hooks count an fsync
(the bytes written, not yet on disk) and a rename (a temporary file complete, not yet in place);
the kill is SIGKILL — no `finally`, no atexit, no flush: what a node losing power leaves."""

KILL_HOOKS = r"""
import os, signal
seen = {}

def event(name):
    seen[name] = seen.get(name, 0) + 1
    if name == kind and seen[name] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

_real_fsync, _real_replace = os.fsync, os.replace

def _fsync(fd):
    event("fsync")
    return _real_fsync(fd)

def _replace(src, dst, **kwargs):
    event("replace")
    return _real_replace(src, dst, **kwargs)

os.fsync, os.replace = _fsync, _replace
"""
