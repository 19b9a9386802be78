"""Ground truth of synthetic cohorts: the brain age each scan was made with.

`hpcbrain synth` writes it to ``derivatives/synth/brain_age.tsv`` beside the BIDS dataset; the
store keeps each scan's ``source_path`` (BIDS_ROOT/sub-*/ses-*/anat/*.nii.gz), which leads back
to it. Real cohorts have no such file, and the evaluation simply reports no brain-age metrics.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from hpcbrain.data.store import CohortStore

TRUTH_FILE = Path("derivatives") / "synth" / "brain_age.tsv"


def _bids_root(source_path: str) -> Path:
    # BIDS_ROOT/sub-XXX/ses-YY/anat/file.nii.gz
    return Path(source_path).parents[3]


def _read_truth(path: Path) -> dict[tuple[str, str], float]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {(row["participant_id"], row["session_id"]): float(row["brain_age"])
                for row in csv.DictReader(handle, delimiter="\t")}


def synthetic_brain_age(store: CohortStore, indices: np.ndarray | None = None) -> np.ndarray | None:
    """Per-scan true brain age [len(indices)] (all scans when None), or None when the store does
    not come from an `hpcbrain synth` cohort whose ground truth is still on disk (or any of the
    scans has no row in it)."""
    meta = store.metadata
    if indices is not None:
        meta = meta.iloc[np.asarray(indices)]
    if "source_path" not in meta or "subject" not in meta or "session" not in meta:
        return None
    tables: dict[Path, dict[tuple[str, str], float] | None] = {}
    values = np.empty(len(meta), dtype=np.float64)
    for i, (source, subject, session) in enumerate(zip(meta["source_path"], meta["subject"],
                                                       meta["session"])):
        try:
            root = _bids_root(str(source))
        except IndexError:
            return None
        if root not in tables:
            path = root / TRUTH_FILE
            tables[root] = _read_truth(path) if path.is_file() else None
        table = tables[root]
        key = (str(subject), str(session))
        if table is None or key not in table:
            return None
        values[i] = table[key]
    return values
