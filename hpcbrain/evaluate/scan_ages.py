"""The chronological age of each scan given to `hpcbrain predict-age`, when it can be known.

Two sources, in this order:

* ``--ages TABLE`` (tab-separated; ``.csv`` comma-separated): a column ``age`` and either
  ``path`` (the scan's path as given, or any path to the same file) or ``participant_id`` +
  ``session_id`` (matched to the BIDS entities of the scan's file name; ``sub-``/``ses-`` prefixes
  optional; a session-less scan is ``ses-01``, as the converter labels it). Every scan needs an
  age there.
* a scan inside a BIDS dataset (``ROOT/sub-X[/ses-Y]/anat/…``): its session's row of
  ``sub-X_sessions.tsv`` (column ``age``), else, for a session-less subject, its row of
  ``participants.tsv`` — the ages `hpcbrain convert` reads. Used when every scan has one.

A missing or unparseable age raises `AgeLookupError` naming the scan and the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hpcbrain.data.bids_filter import entities
from hpcbrain.data.discover import ConversionError, clean_cell, parse_age, read_table

__all__ = ["AgeLookupError", "chronological_ages", "ages_from_table", "ages_from_bids"]


class AgeLookupError(ValueError):
    """A scan's chronological age is missing or unreadable; the message names scan and file."""


def _read(path: Path) -> list[dict[str, str]]:
    """The table's rows as text (`discover.read_table`: the converter's reading of TSV/CSV)."""
    try:
        table = read_table(path, sep="," if path.suffix.lower() == ".csv" else "\t")
    except ConversionError as exc:
        raise AgeLookupError(f"the ages table: {exc}") from None
    return table.to_dict("records")


def _label(value: str, prefix: str) -> str:
    value = str(value).strip()
    return value if value.startswith(prefix) else prefix + value


def _key_of_scan(scan: Path) -> tuple[str, str] | None:
    labels = entities(scan)
    if "sub" not in labels:
        return None
    return f"sub-{labels['sub']}", f"ses-{labels.get('ses', '01')}"


def ages_from_table(scans: Sequence[str | Path], table: str | Path) -> np.ndarray:
    """Ages of `scans` from an ages table (see the module doc)."""
    table = Path(table)
    rows = _read(table)
    columns = set(rows[0]) if rows else set()
    if "age" not in columns or not ({"path"} <= columns
                                    or {"participant_id", "session_id"} <= columns):
        raise AgeLookupError(f"{table}: an ages table needs a column 'age' and either 'path' or "
                             f"'participant_id' and 'session_id'; it has {sorted(columns)}")
    by_path = "path" in columns
    index: dict = {}
    for line, row in enumerate(rows, start=2):
        if by_path:
            key = Path(row["path"]).expanduser()
            key = (key if key.is_absolute() else table.parent / key).resolve()
        else:
            key = (_label(row["participant_id"], "sub-"), _label(row["session_id"], "ses-"))
        index[key] = (row["age"], line)
    ages = []
    for scan in scans:
        if by_path:
            key = Path(scan).expanduser().resolve()
            if key not in index:
                raise AgeLookupError(f"{scan}: no row with this path in {table}")
        else:
            key = _key_of_scan(Path(scan))
            if key is None:
                raise AgeLookupError(f"{scan}: its file name has no sub- entity to match "
                                     f"participant_id in {table}; give the table a 'path' column")
            if key not in index:
                raise AgeLookupError(f"{scan}: no row for {key[0]} {key[1]} in {table}")
        text, line = index[key]
        age, problem = parse_age(clean_cell(text), f"{table} line {line}")
        if problem:
            raise AgeLookupError(f"{scan}: {problem}")
        ages.append(age)
    return np.asarray(ages, dtype=np.float64)


def _bids_place(scan: Path) -> tuple[Path, str, str | None] | None:
    """(dataset root, sub-X, ses-Y or None) of a scan stored as ROOT/sub-X[/ses-Y]/anat/file."""
    scan = Path(scan).expanduser().resolve()
    anat = scan.parent
    if anat.name != "anat":
        return None
    above = anat.parent
    if above.name.startswith("ses-") and above.parent.name.startswith("sub-"):
        return above.parent.parent, above.parent.name, above.name
    if above.name.startswith("sub-"):
        return above.parent, above.name, None
    return None


def ages_from_bids(scans: Sequence[str | Path]) -> Optional[np.ndarray]:
    """Ages of scans inside BIDS datasets from their sessions.tsv / participants.tsv; None when
    a scan is outside any BIDS dataset or its dataset records no ages at all."""
    places = [_bids_place(Path(s)) for s in scans]
    if any(p is None for p in places):
        return None
    tables: dict[Path, list[dict[str, str]] | None] = {}

    def table(path: Path):
        if path not in tables:
            tables[path] = _read(path) if path.is_file() else None
        return tables[path]

    sources = []
    for root, subject, session in places:
        if session is not None:
            sources.append((root / subject / f"{subject}_sessions.tsv", "session_id", session))
        else:
            sources.append((root / "participants.tsv", "participant_id", subject))
    if not any((table(path) or [{}])[0].get("age") is not None for path, _, _ in sources):
        return None                      # datasets that record no ages: predictions only
    ages = []
    for scan, (source, key, label) in zip(scans, sources):
        rows = table(source)
        if not rows or "age" not in rows[0]:
            raise AgeLookupError(f"{scan}: no ages in {source} (a column 'age' is needed, as "
                                 f"the other scans' tables have; or give --ages)")
        prefix = "ses-" if key == "session_id" else "sub-"
        match = [(line, r) for line, r in enumerate(rows, start=2)
                 if _label(r.get(key, ""), prefix) == label]
        if not match:
            raise AgeLookupError(f"{scan}: {source} has no row for {label} (age unknown)")
        line, row = match[0]
        age, problem = parse_age(clean_cell(row["age"]), f"{source} line {line}")
        if problem:
            raise AgeLookupError(f"{scan}: {problem}")
        ages.append(age)
    return np.asarray(ages, dtype=np.float64)


def chronological_ages(scans: Sequence[str | Path],
                       table: str | Path | None = None) -> Optional[np.ndarray]:
    """Each scan's age from `table` when given, else from its BIDS dataset; None when unknown."""
    if table is not None:
        return ages_from_table(scans, table)
    return ages_from_bids(scans)
