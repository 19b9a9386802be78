"""Sources the conversion tests build: NIfTI files and BIDS folders written with nibabel, and a
cohort whose sessions arrive in waves. Imported by tests in any folder (`from sources import
make_bids`): tests/ is on pytest's path."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def phantom(shape=(14, 12, 10), seed=0) -> np.ndarray:
    """An asymmetric head-like block of random intensities in a zero background."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    x, y, z = shape
    vol[2:x - 3, 2:y - 2, 1:z - 2] = rng.uniform(50, 150, (x - 5, y - 4, z - 3))
    vol[2:5, 2:5, 1:4] = 300  # a bright corner: flips would show
    return vol


def save(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def phantom_manifest(folder: Path, n: int, shape=(12, 12, 12)) -> Path:
    """`n` phantom scans s00.nii… (one session each, ages 50, 51, …) in `folder` and the CSV
    manifest `folder/m.csv` that lists them."""
    rows = []
    for i in range(n):
        save(folder / f"s{i:02d}.nii", phantom(shape, seed=i))
        rows.append(f"{folder}/s{i:02d}.nii,s{i:02d},ses-01,{50 + i}")
    manifest = folder / "m.csv"
    manifest.write_text("path,subject,session,age\n" + "\n".join(rows) + "\n")
    return manifest


def make_bids(root: Path, n_subjects=3, n_sessions=2, shape=(14, 12, 10)) -> Path:
    """participants.tsv (sex, group) + sessions.tsv (age, diagnosis, adas_cog) + T1w images."""
    groups = ["CN", "MCI", "AD"]
    write_tsv(root / "participants.tsv", ["participant_id", "sex", "group", "age"],
              [[f"sub-{s:02d}", "MF"[s % 2], groups[s % 3], 60 + s]
               for s in range(1, n_subjects + 1)])
    for s in range(1, n_subjects + 1):
        sub = f"sub-{s:02d}"
        rows = []
        for t in range(1, n_sessions + 1):
            ses = f"ses-{t:02d}"
            rows.append([ses, 60 + s + 1.5 * t, groups[s % 3], "n/a" if t == 2 else 10.0 * s])
            save(root / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz",
                 phantom(shape, seed=10 * s + t))
        write_tsv(root / sub / f"{sub}_sessions.tsv",
                  ["session_id", "age", "diagnosis", "adas_cog"], rows)
    return root


def arriving_in_waves(root: Path, n_subjects: int = 5, shape=(14, 12, 10)):
    """A BIDS folder of `n_subjects` × 3 sessions under `root`, and `show(wave)`, which leaves
    in it the sessions of waves ≤ `wave` only and returns it (wave 1: every ses-01 but the last
    subject's; wave 2: their ses-02; wave 3: the rest) — a cohort whose scans arrive in waves."""
    source = make_bids(root / "bids", n_subjects=n_subjects, n_sessions=3, shape=shape)
    held = root / "held"
    last = f"sub-{n_subjects:02d}"

    def wave_of(sub: str, ses: str) -> int:
        return 3 if sub == last or ses == "ses-03" else int(ses[-1])

    def show(wave: int) -> Path:
        for folder in sorted(source.glob("sub-*/ses-*")) + sorted(held.glob("sub-*/ses-*")):
            sub, ses = folder.parent.name, folder.name
            target = (source if wave_of(sub, ses) <= wave else held) / sub / ses
            if folder != target:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(folder, target)
        return source

    return show
