"""The conversion ledger: what happened to every scan of the source, kept with the store.

One row per scan `discover` found, in its order:

| field | meaning |
|---|---|
| path, subject, session | the scan |
| status | ``ok`` (in the store), ``failed`` (its image could not be converted: unreadable, NaN,
  a failed registration, …) or ``skipped`` (left out before its image was read: missing or bad
  age, a duplicate, a missing file) |
| reason | why it failed or was skipped (empty when ok) |
| seconds | the time its conversion took (load, preprocess, QC; empty when skipped) |
| template_corr, foreground, p01, p50, p99 | the QC metrics of `scan_qc` (ok scans) |
| flags | what in the QC looks like a failure, ``;``-separated (`scan_qc.qc_flags`) |
| store_index | its row in the store's arrays (ok scans; −1 otherwise) |

Kept in the store as the Zarr group ``ledger`` (one 1-D array per field: plain zarr reads it)
and written as ``conversion.tsv`` in the store's QC folder (`hpcbrain.data.qc_report`). While a
conversion runs, each shard's rows are written beside the shard
(``hpcbrain_ledger_staging/NNNNNNNNN.json`` in the ``.partial`` folder, removed once the store is
complete) before its progress is recorded, so a resumed conversion keeps them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hpcbrain.atomic import write_text_atomic
from hpcbrain.data.scan_qc import QC_FIELDS, qc_flags

__all__ = ["LEDGER_GROUP", "LEDGER_TSV", "FIELDS", "STATUSES", "ledger_rows",
           "write_shard_entries", "read_shard_entries", "remove_staging", "write_ledger_group", "read_ledger",
           "write_ledger_tsv"]

LEDGER_GROUP = "ledger"
LEDGER_TSV = "conversion.tsv"
STATUSES = ("ok", "failed", "skipped")
FIELDS = ("path", "subject", "session", "status", "reason", "seconds", *QC_FIELDS, "flags",
          "store_index")
_NUMERIC = ("seconds", *QC_FIELDS, "store_index")
_STAGING = "hpcbrain_ledger_staging"


def write_shard_entries(partial: Path, shard: int, entries: list[dict[str, Any]]) -> None:
    """The entries (``index`` into the discovered scans, ``status``, …) of one shard's scans and
    of the scans that failed since the previous shard."""
    folder = Path(partial) / _STAGING
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"{shard:06d}.json", json.dumps(entries))


def remove_staging(store: Path) -> None:
    import shutil

    shutil.rmtree(Path(store) / _STAGING, ignore_errors=True)


def read_shard_entries(partial: Path) -> dict[int, dict[str, Any]]:
    """Every staged entry of a (possibly resumed) conversion, by scan index."""
    out: dict[int, dict[str, Any]] = {}
    for path in sorted((Path(partial) / _STAGING).glob("*.json")):
        for entry in json.loads(path.read_text()):
            out[int(entry["index"])] = entry
    return out


def ledger_rows(scans, entries: dict[int, dict[str, Any]], reasons: dict[int, list[str]],
                store_index: dict[int, int]) -> list[dict[str, Any]]:
    """The ledger, one row per discovered scan: `entries` from the workers (ok and failed),
    `reasons` for every scan left out, `store_index` of the scans in the store."""
    rows = []
    for i, scan in enumerate(scans):
        entry = entries.get(i, {})
        row: dict[str, Any] = {"path": str(scan.path or ""), "subject": scan.subject or "",
                               "session": scan.session or "", "reason": "", "seconds": np.nan,
                               **{k: np.nan for k in QC_FIELDS}, "flags": "",
                               "store_index": store_index.get(i, -1)}
        if i in store_index:
            row["status"] = "ok"
        elif entry:
            row["status"] = "failed"
        else:
            row["status"] = "skipped"
        if i in reasons and row["status"] != "ok":
            row["reason"] = "; ".join(reasons[i])
        if entry:
            row["seconds"] = float(entry.get("seconds", np.nan))
            qc = entry.get("qc") or {}
            row.update({k: float(qc[k]) for k in QC_FIELDS if k in qc})
            row["flags"] = "; ".join(qc_flags(qc)) if qc else ""
        rows.append(row)
    return rows


def write_ledger_group(group, rows: list[dict[str, Any]]) -> None:
    """The ledger as the subgroup `LEDGER_GROUP` of an open Zarr group."""
    sub = group.require_group(LEDGER_GROUP)
    for name in FIELDS:
        values = [row[name] for row in rows]
        if name in _NUMERIC:
            dtype = "int64" if name == "store_index" else "float32"
            array = sub.create_array(name, shape=(len(rows),), dtype=dtype, overwrite=True)
            array[...] = np.asarray(values, dtype=dtype)
        else:
            array = sub.create_array(name, shape=(len(rows),), dtype=str, overwrite=True)
            array[...] = np.asarray(values, dtype=str)


def read_ledger(store: str | Path) -> list[dict[str, Any]]:
    """The ledger of a finished store (empty for a store made before ledgers existed)."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    if LEDGER_GROUP not in group:
        return []
    sub = group[LEDGER_GROUP]
    columns = {name: sub[name][...] for name in FIELDS}
    n = len(columns["path"])
    return [{name: (columns[name][i].item() if name in _NUMERIC else str(columns[name][i]))
             for name in FIELDS} for i in range(n)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return str(value).replace("\t", " ").replace("\n", " ")


def write_ledger_tsv(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    lines = ["\t".join(FIELDS)] + ["\t".join(_cell(row[f]) for f in FIELDS) for row in rows]
    return write_text_atomic(path, "\n".join(lines) + "\n")
