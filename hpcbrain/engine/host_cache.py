"""Measurements taken once per host and kept: a CPU's peak FLOP/s (flops.py). Kept in
``$HPCBRAIN_CACHE_DIR`` or ``~/.cache/hpcbrain``, one JSON file per kind, keyed by what the figure
depends on (CPU model, threads, dtype)."""
from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_model(text: str | None = None) -> str:
    for line in (cpuinfo() if text is None else text).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_path(filename: str) -> Path:
    root = os.environ.get("HPCBRAIN_CACHE_DIR") or Path.home() / ".cache" / "hpcbrain"
    return Path(root) / filename


def cached_measurement(path: Path, key: str, measure: Callable[[], Any]) -> Any:
    """``measure()`` the first time `key` is asked for on this host, the stored value after.
    The file is replaced atomically; a read-only home only means measuring again next time."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=2))
            os.replace(tmp, path)
        except OSError:
            log.debug("could not keep %s in %s", key, path)
    return known[key]
