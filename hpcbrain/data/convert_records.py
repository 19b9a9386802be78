"""What a conversion records and checks, shared by the one-process conversion (`convert`) and
the conversion in blocks (`convert_blocks`): the per-scan columns, the inputs' fingerprint (which
makes a rerun resume instead of starting over), the bad-scan report, the never-overwrite rule."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hpcbrain.data.discover import ConversionError, Scan
from hpcbrain.data.store import ImageLayout

__all__ = ["build_columns", "inputs_fingerprint", "describe_bad", "refuse_existing",
           "hpcbrain_version"]


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"{out} already exists: hpcbrain never overwrites a store; "
                              f"delete it (rm -r {out}) or pass another --out")


def build_columns(scans: list[Scan]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    columns: dict[str, np.ndarray] = {
        "subject": np.array([s.subject for s in scans], dtype=object),
        "session": np.array([s.session for s in scans], dtype=object),
        "age": np.array([s.age for s in scans], dtype=np.float32),
        "source_path": np.array([str(s.path) for s in scans], dtype=object),
    }
    names: list[str] = []
    for scan in scans:
        names.extend(k for k in scan.meta if k not in names)
    for name in names:
        raw = [scan.meta.get(name) for scan in scans]
        try:
            columns[name] = np.array([np.nan if v is None else float(v) for v in raw],
                                     dtype=np.float32)
        except ValueError:
            columns[name] = np.array(["" if v is None else v for v in raw], dtype=object)
    types = {k: ("str" if v.dtype == object else str(v.dtype)) for k, v in columns.items()}
    return columns, types


def inputs_fingerprint(scans: list[Scan], size: int, layout: ImageLayout,
                       preprocessing: dict) -> str:
    items = []
    for scan in scans:
        try:
            stat = scan.path.stat() if scan.path else None
            file = [stat.st_size, stat.st_mtime_ns] if stat else None
        except OSError:
            file = None
        items.append([str(scan.path), file, scan.subject, scan.session, scan.age,
                      sorted(scan.meta.items()), scan.problems])
    blob = json.dumps({"scans": items, "shape": size, "dtype": layout.dtype,
                       "scans_per_shard": layout.scans_per_shard, "codec": layout.codec_attrs(),
                       "preprocessing": preprocessing}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe_bad(bad: list[tuple[str, str, str, str]], n_scans: int, header: str = "") -> str:
    lines = [header or f"{len(bad)} of {n_scans} scans are bad; nothing was written "
                       f"(fix them, or pass --skip-bad / skip_bad=True to convert the rest):"]
    lines += [f"  {sub or '?'} {ses or '?'}  {path}: {reason}" for path, sub, ses, reason in bad]
    return "\n".join(lines)


def hpcbrain_version() -> str:
    try:
        from importlib.metadata import version

        return version("hpcbrain")
    except Exception:
        return "unknown"
