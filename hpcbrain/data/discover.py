"""Which scans a cohort source holds: a BIDS folder or a CSV manifest → a list of `Scan`s with
their metadata, before any image is read (`discover_scans`; `hpcbrain.data.convert` writes
them into a store).

Sources
-------
* **BIDS folder**: ``participants.tsv`` (``participant_id`` + any columns, optional),
  ``sub-*/sub-*_sessions.tsv`` (``session_id``, ``age`` + any columns) and images
  ``sub-*/ses-*/anat/sub-*_ses-*[_entities]_T1w.nii[.gz]``. Scans are ordered by subject then
  session. Session-level values win over participant-level ones of the same name; the
  participant-level column is then kept as ``participant_<name>`` (e.g. a baseline ``age`` in
  participants.tsv becomes ``participant_age``).
  A subject **without session folders** (``sub-X/anat/sub-X_T1w.nii.gz``) has one scan, labelled
  session ``ses-01``; its age comes from participants.tsv's ``age`` column.
  Repeat runs of one protocol in a session (``run-1``, ``run-2``, … and nothing else different,
  e.g. a test–retest rescan) → the lowest run is used. Other sets of several T1w images for one
  subject/session (e.g. two acquisitions) are a *duplicate*: choose one with ``--bids-filter``
  (`hpcbrain.data.bids_filter`, e.g. ``{"t1w": {"acquisition": "mprage"}}``) or name it in a
  CSV manifest.
* **CSV manifest** (``.csv``; ``.tsv`` is read tab-separated): columns ``path``, ``subject``,
  ``age`` (required), ``session`` (optional, default ``ses-01``), then any columns. Relative paths
  resolve against the manifest's folder. Rows keep the manifest's order.

Every further column becomes a per-scan column: numeric (every non-missing value parses as a
number) → float32 with NaN for missing; otherwise str with ``""`` for missing. Missing means an
empty cell or ``n/a`` / ``NA`` / ``nan`` / ``null`` / ``none`` (any case). Names are sanitised to
``[A-Za-z0-9_.-]``; a name the store reserves gets a prefix (``participant_``, ``session_``,
``extra_``). Always present: ``subject``, ``session``, ``age`` (float32), ``source_path``
(absolute path), ``affine`` (N, 4, 4: the source affine after reorientation to RAS+) and
``voxel_size_mm`` (float32, the output voxel size of each scan; the attribute ``spacing_mm`` is
``[v, v, v]`` when every scan has the same, else null).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcbrain.data.bids_filter import BidsFilterError, entities, load_filter, matches
from hpcbrain.data.store import IMAGES

DEFAULT_SESSION = "ses-01"
FIXED_COLUMNS = ("subject", "session", "age", "source_path", "affine", "voxel_size_mm")
MISSING_TEXT = frozenset(("", "n/a", "na", "nan", "null", "none"))
RESERVED_NAMES = frozenset((IMAGES, *FIXED_COLUMNS))


class ConversionError(ValueError):
    """A conversion cannot proceed; for bad scans the message lists every one and why.

    ``bad`` holds ``(path, subject, session, reason)`` for each bad scan (empty for other
    errors, e.g. an existing output store).
    """

    def __init__(self, message: str, bad: list[tuple[str, str, str, str]] | None = None):
        super().__init__(message)
        self.bad = list(bad or [])


@dataclass
class Scan:
    """One scan as discovered from the source, before its image is read."""

    path: Path | None
    subject: str
    session: str
    age: float | None
    meta: dict[str, str | None] = field(default_factory=dict)  # further columns, raw text
    problems: list[str] = field(default_factory=list)



def _is_missing(value: Any) -> bool:
    return value is None or str(value).strip().lower() in MISSING_TEXT


def clean_cell(value: Any) -> str | None:
    return None if _is_missing(value) else str(value).strip()


def parse_age(text: str | None, where: str) -> tuple[float | None, str | None]:
    if text is None:
        return None, f"age is missing (empty or n/a) in {where}"
    try:
        age = float(text)
    except ValueError:
        return None, f"age {text!r} in {where} is not a number"
    if not math.isfinite(age):
        return None, f"age {text!r} in {where} is not finite"
    return age, None


def read_table(path: Path, sep: str = "\t"):
    import pandas as pd

    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _column_name(name: str, prefix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name.strip()) or "column"
    if name.startswith(".") or name.startswith("__"):
        name = "col" + name
    return prefix + name if name in RESERVED_NAMES else name


def _label(value: str, prefix: str) -> str:
    value = value.strip()
    return value if value.startswith(prefix) else prefix + value


def _t1w_images(anat: Path, prefix: str, allowed=None) -> list[Path]:
    if not anat.is_dir():
        return []
    return sorted(p for p in anat.glob(f"{prefix}_*T1w.nii*")
                  if p.name.endswith(("_T1w.nii", "_T1w.nii.gz")) and p.is_file()
                  and matches(p, allowed))


def _read_bids(root: Path, allowed=None) -> list[Scan]:
    subjects = sorted(d for d in root.glob("sub-*") if d.is_dir())
    if not subjects:
        raise ConversionError(f"{root} holds no sub-* folders: not a BIDS dataset (or pass a "
                              f"CSV manifest with columns path, subject, session, age)")
    participants: dict[str, dict[str, str | None]] = {}
    participant_dups: set[str] = set()
    ptsv = root / "participants.tsv"
    if ptsv.exists():
        table = read_table(ptsv)
        if "participant_id" not in table.columns:
            raise ConversionError(f"{ptsv} has no participant_id column")
        for row in table.to_dict("records"):
            sub = _label(row.pop("participant_id"), "sub-")
            if sub in participants:
                participant_dups.add(sub)
            participants[sub] = {k: clean_cell(v) for k, v in row.items()}

    # Read every sessions.tsv first: a name found in any of them wins over participants.tsv.
    sessions: dict[str, dict[str, dict[str, str | None]] | None] = {}
    session_dups: dict[str, set[str]] = {}
    session_names: set[str] = set()
    for subdir in subjects:
        stsv = subdir / f"{subdir.name}_sessions.tsv"
        if not stsv.exists():
            sessions[subdir.name] = None
            continue
        table = read_table(stsv)
        if "session_id" not in table.columns:
            raise ConversionError(f"{stsv} has no session_id column")
        rows: dict[str, dict[str, str | None]] = {}
        for row in table.to_dict("records"):
            ses = _label(row.pop("session_id"), "ses-")
            if ses in rows:
                session_dups.setdefault(subdir.name, set()).add(ses)
            rows[ses] = {k: clean_cell(v) for k, v in row.items()}
            session_names.update(k for k in rows[ses] if k != "age")
        sessions[subdir.name] = rows

    def participant_meta(sub: str, sessionless: bool) -> dict[str, str | None]:
        meta = {}
        for key, value in participants.get(sub, {}).items():
            if key == "age" and sessionless:
                continue  # it is the scan's age
            name = _column_name(key, "participant_")  # a reserved name (age) gets the prefix
            if key in session_names and not name.startswith("participant_"):
                name = "participant_" + name  # sessions.tsv has the same name: it wins
            meta[name] = value
        return meta

    scans: list[Scan] = []
    for subdir in subjects:
        sub = subdir.name
        ses_dirs = sorted(d for d in subdir.glob("ses-*") if d.is_dir())
        common = [f"participant {sub} is listed twice in {ptsv}"] if sub in participant_dups \
            else []
        if not ses_dirs:  # a BIDS dataset without sessions: one scan, session ses-01
            where = f"{ptsv} (column age)"
            age_text = participants.get(sub, {}).get("age")
            if not ptsv.exists():
                age, problem = None, f"no {ptsv} to give the age of a session-less subject"
            elif sub not in participants:
                age, problem = None, f"{sub} has no row in {ptsv}"
            else:
                age, problem = parse_age(age_text, where)
            for image in _t1w_images(subdir / "anat", sub, allowed):
                scans.append(Scan(image, sub, DEFAULT_SESSION, age, participant_meta(sub, True),
                                  common + ([problem] if problem else [])))
            continue
        stsv = subdir / f"{sub}_sessions.tsv"
        rows = sessions[sub]
        for ses_dir in ses_dirs:
            ses = ses_dir.name
            images = _t1w_images(ses_dir / "anat", f"{sub}_{ses}", allowed)
            if not images:
                continue
            problems = list(common)
            if rows is None:
                age, problem = None, f"no {stsv.name} to give the age"
                row = {}
            elif ses not in rows:
                age, problem = None, f"{ses} has no row in {stsv.name} (age unknown)"
                row = {}
            else:
                row = rows[ses]
                age, problem = parse_age(row.get("age"), stsv.name)
                if ses in session_dups.get(sub, ()):
                    problems.append(f"{ses} is listed twice in {stsv.name}")
            if problem:
                problems.append(problem)
            meta = participant_meta(sub, False)
            for key, value in row.items():
                if key != "age":
                    meta[_column_name(key, "session_")] = value
            for image in images:
                scans.append(Scan(image, sub, ses, age, dict(meta), list(problems)))
    return scans


def _read_manifest(path: Path) -> list[Scan]:
    table = read_table(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    missing = [c for c in ("path", "subject", "age") if c not in table.columns]
    if missing:
        raise ConversionError(f"manifest {path} lacks columns {missing}; it needs path, "
                              f"subject, session, age (then any columns)")
    scans = []
    for line, row in enumerate(table.to_dict("records"), start=2):
        problems = []
        text = clean_cell(row.pop("path"))
        image: Path | None = None
        if text is None:
            problems.append(f"manifest line {line}: empty path")
        else:
            image = Path(text).expanduser()
            if not image.is_absolute():
                image = path.parent / image
            image = Path(os.path.abspath(image))
            if not image.is_file():
                problems.append("file does not exist")
        subject = clean_cell(row.pop("subject"))
        if subject is None:
            problems.append(f"manifest line {line}: empty subject")
        session = clean_cell(row.pop("session", None)) or DEFAULT_SESSION
        age, problem = parse_age(clean_cell(row.pop("age")), f"manifest line {line}")
        if problem:
            problems.append(problem)
        meta = {_column_name(k, "extra_"): clean_cell(v) for k, v in row.items()}
        scans.append(Scan(image, subject or "", session, age, meta, problems))
    return scans


def _lowest_runs(scans: list[Scan]) -> list[Scan]:
    """Repeat runs of one protocol in one session (images whose names differ only in the run
    entity: a test–retest rescan, a repeat after motion) → the lowest-numbered run, logged.
    Images that differ in anything else (acquisition, reconstruction, …) stay: that choice is
    the user's (a duplicate naming --bids-filter)."""
    import logging

    def protocol(scan: Scan) -> tuple:
        labels = entities(scan.path)
        return (scan.subject, scan.session,
                tuple(sorted((k, v) for k, v in labels.items() if k != "run")))

    runs: dict[tuple, list[Scan]] = {}
    for scan in scans:
        runs.setdefault(protocol(scan), []).append(scan)
    keep, dropped = set(), 0
    for members in runs.values():
        numbered = [m for m in members if entities(m.path).get("run", "").isdigit()]
        if len(members) > 1 and len(numbered) == len(members):
            keep.add(id(min(members, key=lambda m: int(entities(m.path)["run"]))))
            dropped += len(members) - 1
        else:
            keep.update(id(m) for m in members)
    if dropped:
        logging.getLogger(__name__).warning(
            "%d repeat runs skipped: each session's lowest run is used (choose others with "
            "--bids-filter, e.g. '{\"t1w\": {\"run\": 2}}')", dropped)
    return [s for s in scans if id(s) in keep]


def discover_scans(source: str | Path, bids_filter: str | None = None
                   ) -> tuple[list[Scan], str]:
    """List the scans of a BIDS folder or CSV manifest with their metadata problems.

    Returns ``(scans, format)`` with format ``"bids"`` or ``"manifest"``. Problems found
    without reading images (missing or bad age, missing file, duplicate subject/session) are
    in each scan's ``problems``. `bids_filter` (JSON or a JSON file, `bids_filter.load_filter`)
    keeps only the matching T1w images of a BIDS folder.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise ConversionError(f"source {source} does not exist")
    try:
        allowed = load_filter(bids_filter)
    except BidsFilterError as exc:
        raise ConversionError(str(exc)) from None
    if source.is_dir():
        scans, fmt = _read_bids(source, allowed), "bids"
    else:
        if allowed:
            raise ConversionError("--bids-filter chooses among a BIDS folder's images; a CSV "
                                  "manifest names its images itself")
        scans, fmt = _read_manifest(source), "manifest"
    if fmt == "bids":
        scans = _lowest_runs(scans)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, scan in enumerate(scans):
        if scan.subject:
            groups.setdefault((scan.subject, scan.session), []).append(i)
    for (subject, session), members in groups.items():
        if len(members) > 1:
            for i in members:
                others = ", ".join(str(scans[j].path) for j in members if j != i)
                advice = ("; choose one with --bids-filter, e.g. '{\"t1w\": {\"run\": 1}}'"
                          if fmt == "bids" else "")
                scans[i].problems.append(
                    f"duplicate subject/session {subject} {session} (also: {others}){advice}")
    return scans, fmt
