"""hpcbrain as a BIDS-App: ``hpcbrain bids-app BIDS_DIR OUTPUT_DIR participant|group --model URI``.

``participant`` applies a registered model to each selected participant's T1w scans (prepared
as the model's training store was: `evaluate.model_inputs`) and writes BIDS derivatives beside
the source layout, ``OUTPUT_DIR/sub-X[/ses-Y]/anat/<source entities>_desc-hpcbrain_<what>.tsv``
with a JSON sidecar each:

* ``latent``: one row z0…z{D−1}, for an encoder;
* ``somnode`` (som_row, som_col: the best-matching node) and ``similarity`` (the Nr × Nc
  similarity grid ρ, one row per grid row), for an encoder that carries a SOM grid (LSOR);
* ``brainage``: for a brain-age model (`tracking.registered_age_model`): predicted_age, its
  prediction interval (interval_low, interval_high), extrapolated and, when the session's age
  is in the dataset's sessions.tsv / participants.tsv, age, brain_age_gap and
  brain_age_gap_corrected; the sidecar describes each column and carries the model card.

``OUTPUT_DIR/dataset_description.json`` says what made the dataset (DatasetType derivative,
GeneratedBy hpcbrain with its version and the model URI, SourceDatasets the raw dataset).
Participants can be processed by separate processes into the same OUTPUT_DIR (one per Slurm
array task); one OUTPUT_DIR holds one model's outputs only. ``group`` gathers every
participant's files into ``OUTPUT_DIR/group/`` tables (latents.tsv, somnodes.tsv,
brainage.tsv) with figures: the SOM occupancy; predicted against chronological age with the
intervals, and the gap against age before and after the age-bias correction.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcbrain.atomic import atomic_write, write_text_atomic
from hpcbrain.bids_app_som import save_figure, write_table
from hpcbrain.data.bids_filter import entities

BIDS_VERSION = "1.9.0"
log = logging.getLogger(__name__)

DESC = "hpcbrain"
SUFFIXES = {"latent": "latent", "somnode": "somnode", "similarity": "similarity",
            "brainage": "brainage"}


class BidsAppError(ValueError):
    """A request the BIDS-App cannot carry out (bad labels, another model's output folder)."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hpcbrain")
    except Exception:
        return "unknown"


def _labels(values: Sequence[str] | None, prefix: str) -> set[str] | None:
    if not values:
        return None
    return {v if v.startswith(prefix) else prefix + v for v in values}


@dataclass
class SelectedScan:
    path: Path
    subject: str
    session: str


def select_scans(bids_dir: Path, participants: Sequence[str] | None,
                 sessions: Sequence[str] | None, bids_filter: str | None) -> list[SelectedScan]:
    """The T1w images of the chosen participants and sessions; ages are not needed here, but
    two images for one session are (choose with --bids-filter)."""
    from hpcbrain.data.discover import ConversionError, discover_scans

    if not bids_dir.is_dir():
        raise BidsAppError(f"{bids_dir} is not a folder: BIDS_DIR must be a BIDS dataset")
    try:
        scans, _ = discover_scans(bids_dir, bids_filter)
    except ConversionError as exc:
        raise BidsAppError(str(exc)) from None
    wanted_subjects, wanted_sessions = _labels(participants, "sub-"), _labels(sessions, "ses-")
    present = {s.subject for s in scans}
    if wanted_subjects and wanted_subjects - present:
        raise BidsAppError(f"--participant-label {sorted(wanted_subjects - present)}: no T1w "
                           f"images for them in {bids_dir}")
    chosen = [s for s in scans if (not wanted_subjects or s.subject in wanted_subjects)
              and (not wanted_sessions or s.session in wanted_sessions)]
    duplicates = [p for s in chosen for p in s.problems if p.startswith("duplicate")]
    if duplicates:
        raise BidsAppError("\n".join(sorted(set(duplicates))))
    if not chosen:
        raise BidsAppError(f"no T1w images in {bids_dir} for the participants and sessions "
                           f"asked for")
    return [SelectedScan(Path(s.path), s.subject, s.session) for s in chosen]


def dataset_description(bids_dir: Path, model_uri: str) -> dict:
    source = {"URL": bids_dir.resolve().as_uri()}
    raw = bids_dir / "dataset_description.json"
    if raw.is_file():
        try:
            meta = json.loads(raw.read_text())
            source.update({k: meta[k] for k in ("DatasetDOI", "Version") if k in meta})
        except ValueError:
            pass
    return {"Name": "hpcbrain derivatives", "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "hpcbrain", "Version": _version(),
                             "Description": f"model {model_uri}"}],
            "SourceDatasets": [source]}


def _claim_output(output_dir: Path, description: dict) -> None:
    """Write dataset_description.json, or check that the one there is this model's.

    Array tasks start together on one output folder: the file is made complete beside its name
    and linked to it (`os.link` fails when the name exists), so exactly one task's file lands
    whole and every other task, of this model or another, checks it like a later run would."""
    path = output_dir / "dataset_description.json"
    if not path.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        draft = output_dir / f".dataset_description.{uuid.uuid4().hex}.json"   # tasks on
        # several hosts: a pid is not unique
        write_text_atomic(draft, json.dumps(description, indent=2) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass                     # another task claimed it first: check theirs below
        finally:
            draft.unlink(missing_ok=True)
    existing = json.loads(path.read_text())
    made_by = [g.get("Description") for g in existing.get("GeneratedBy", [])]
    if made_by != [g["Description"] for g in description["GeneratedBy"]]:
        raise BidsAppError(f"{output_dir} holds derivatives of {made_by}; write "
                           f"{description['GeneratedBy'][0]['Description']}'s elsewhere")


def _derivative_base(scan: SelectedScan, bids_dir: Path, output_dir: Path) -> Path:
    """OUTPUT_DIR/<the source's folder>/<its entities>_desc-hpcbrain (no suffix yet)."""
    relative = scan.path.resolve().relative_to(bids_dir.resolve())
    stem = relative.name.split(".")[0].rsplit("_", 1)[0]          # drop _T1w and the extension
    return output_dir / relative.parent / f"{stem}_desc-{DESC}"


def _write_tsv(path: Path, header: list[str], rows: list[list], sidecar: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", what="a BIDS derivative") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            handle.write("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                   for v in row) + "\n")
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n",
                      what="a BIDS derivative's sidecar")
    return path


def run_participant(bids_dir: str | Path, output_dir: str | Path, model_uri: str,
                    participants: Sequence[str] | None = None,
                    sessions: Sequence[str] | None = None,
                    bids_filter: str | None = None, batch_size: int = 8) -> list[Path]:
    """Participant level (see the module doc); returns the files written."""
    import torch

    from hpcbrain.evaluate.embed import apply_to_scans, load_registered, som_of
    from hpcbrain.methods.som import similarity_grid, squared_distances

    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    scans = select_scans(bids_dir, participants, sessions, bids_filter)
    module, model_dir, preparation = load_registered(model_uri)
    _claim_output(output_dir, dataset_description(bids_dir, model_uri))
    outputs = apply_to_scans(module, [s.path for s in scans], preparation, batch_size)
    som = som_of(model_dir)
    brain_ages = _brain_age_rows(scans, outputs, model_dir) if outputs.ndim == 1 else None
    ages = _known_ages(scans) if som is not None else None
    written = []
    for k, (scan, out) in enumerate(zip(scans, outputs)):
        base = _derivative_base(scan, bids_dir, output_dir)
        source = f"bids:raw:{scan.path.resolve().relative_to(bids_dir.resolve())}"
        common = {"Sources": [source], "GeneratedBy": f"hpcbrain {_version()}, model {model_uri}",
                  "Preparation": {"shape": list(preparation.grid.shape),
                                  "grid": preparation.grid.name,
                                  "registered": preparation.register}}
        if brain_ages is not None:
            rows, sidecar = brain_ages
            written.append(_write_tsv(Path(f"{base}_{SUFFIXES['brainage']}.tsv"),
                                      list(rows[k]), [list(rows[k].values())],
                                      {**common, **sidecar}))
            continue
        written.append(_write_tsv(Path(f"{base}_{SUFFIXES['latent']}.tsv"),
                                  [f"z{k}" for k in range(out.shape[0])],
                                  [[float(v) for v in out]],
                                  {**common, "Description": "the encoder's latent vector"}))
        if som is not None:
            z = torch.from_numpy(out[None]).to(torch.float64)
            nodes = torch.from_numpy(som["nodes"]).to(torch.float64)
            rows, cols = som["grid"]
            node = int(squared_distances(z, nodes).argmin(dim=1))
            rho = similarity_grid(z, nodes).numpy().reshape(rows, cols)
            header, cells = (["som_row", "som_col", "som_rows", "som_cols"],
                             [node // cols, node % cols, rows, cols])
            if ages is not None:
                header, cells = header + ["age"], cells + [float(ages[k])]
            written.append(_write_tsv(Path(f"{base}_{SUFFIXES['somnode']}.tsv"), header,
                                      [cells], {**common, **SOM_NODE_COLUMNS,
                                                "Description": "the best-matching node of the "
                                                "model's SOM grid (row-major, 0-based)"}))
            written.append(_write_tsv(Path(f"{base}_{SUFFIXES['similarity']}.tsv"),
                                      [f"col{c}" for c in range(cols)],
                                      [[float(v) for v in row] for row in rho],
                                      {**common, "Description": "similarity ρ of the latent to "
                                       "every node, one row per grid row"}))
    return written


#: What each SOM-node column means (the sidecar of every _somnode.tsv).
SOM_NODE_COLUMNS = {
    "som_row": {"Description": "row of the best-matching node, 0-based"},
    "som_col": {"Description": "column of the best-matching node, 0-based"},
    "som_rows": {"Description": "rows of the model's SOM grid (its shape, whatever nodes the "
                                "scans occupy)"},
    "som_cols": {"Description": "columns of the model's SOM grid"},
    "age": {"Description": "chronological age at the scan (sessions.tsv / participants.tsv)",
            "Units": "year"},
}


def _known_ages(scans: list[SelectedScan]) -> np.ndarray | None:
    """The scans' ages from their BIDS tables, or None (with a warning when some are missing):
    for the SOM outputs an age is a label for the figures, not something to stop for."""
    from hpcbrain.evaluate.scan_ages import AgeLookupError, ages_from_bids

    try:
        return ages_from_bids([s.path for s in scans])
    except AgeLookupError as exc:
        log.warning("SOM outputs without ages: %s", exc)
        return None


#: What each brain-age column means (the sidecar of every _brainage.tsv).
BRAIN_AGE_COLUMNS = {
    "predicted_age": {"Description": "age predicted by the model from the scan (brain age)",
                      "Units": "year"},
    "interval_low": {"Description": "lower end of the split-conformal prediction interval "
                                    "for the chronological age (level: IntervalLevel)",
                     "Units": "year"},
    "interval_high": {"Description": "upper end of that interval", "Units": "year"},
    "extrapolated": {"Description": "true when predicted_age lies outside the training "
                                    "cohort's ages: the model has not seen such brains",
                     "Levels": {"true": "outside", "false": "inside"}},
    "age": {"Description": "chronological age at the scan (sessions.tsv / participants.tsv)",
            "Units": "year"},
    "brain_age_gap": {"Description": "predicted_age - age, uncorrected", "Units": "year"},
    "brain_age_gap_corrected": {"Description": "the gap with the age bias of the model "
                                               "removed (fitted on the model's calibration "
                                               "subjects; ModelCard gives the formula)",
                                "Units": "year"},
}


def _brain_age_rows(scans: list[SelectedScan], predicted: np.ndarray, model_dir: Path):
    """Per scan the brain-age columns (as text) and the sidecar keys they share."""
    from hpcbrain.evaluate.age_calibration import load_calibration
    from hpcbrain.evaluate.age_predictor import calibrated, rows_of
    from hpcbrain.evaluate.scan_ages import AgeLookupError, ages_from_bids

    calibration = load_calibration(model_dir)
    try:
        ages = ages_from_bids([s.path for s in scans])
    except AgeLookupError as exc:
        raise BidsAppError(str(exc)) from None
    result = calibrated(predicted, calibration, ages)
    rows = rows_of(result)
    sidecar = {name: BRAIN_AGE_COLUMNS[name] for name in rows[0]}
    sidecar["IntervalLevel"] = result.level if calibration is not None else None
    sidecar["ModelCard"] = calibration.card() if calibration is not None else None
    return rows, sidecar


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def _brain_age_figures(header: list[str], rows: list[list[str]], group: Path, plt) -> list[Path]:
    """brainage.png: predicted against chronological age with the identity line and each scan's
    interval (a histogram of the predictions when no ages are known); brainage_gap.png: the gap
    against age before and after the age-bias correction."""
    def column(name: str) -> np.ndarray:
        at = 3 + header.index(name)
        return np.array([float(r[at]) if r[at] != "n/a" else np.nan for r in rows])

    predicted = column("predicted_age")
    written = []
    figure, axis = plt.subplots(figsize=(5, 4.5))
    if "age" not in header:
        axis.hist(predicted, bins=20)
        axis.set_xlabel("predicted age (years)")
        axis.set_ylabel("scans")
    else:
        age, low, high = column("age"), column("interval_low"), column("interval_high")
        finite = np.isfinite(low) & np.isfinite(high)
        axis.errorbar(age[finite], predicted[finite],
                      yerr=[predicted[finite] - low[finite], high[finite] - predicted[finite]],
                      fmt="o", ms=3, lw=0.6, alpha=0.7, label="predicted ± interval")
        axis.plot(age[~finite], predicted[~finite], "o", ms=3)
        ends = [np.nanmin([age.min(), predicted.min()]), np.nanmax([age.max(), predicted.max()])]
        axis.plot(ends, ends, "k--", lw=1, label="identity")
        covered = np.mean((age >= low) & (age <= high))
        axis.set_title(f"{len(rows)} scans; interval covers {100 * covered:.0f} %")
        axis.set_xlabel("chronological age (years)")
        axis.set_ylabel("predicted age (years)")
        axis.legend(loc="upper left")
    written.append(save_figure(figure, group / "brainage.png", plt))
    if "brain_age_gap" in header:
        age = column("age")
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        for axis, name, title in ((axes[0], "brain_age_gap", "uncorrected"),
                                  (axes[1], "brain_age_gap_corrected", "age-bias corrected")):
            gap = column(name)
            axis.plot(age, gap, "o", ms=3, alpha=0.7)
            axis.axhline(0.0, color="k", lw=1)
            ok = np.isfinite(gap)
            if ok.sum() > 2 and np.ptp(age[ok]) > 0:
                slope, intercept = np.polyfit(age[ok], gap[ok], 1)
                axis.plot(age[ok], slope * age[ok] + intercept, "r-", lw=1,
                          label=f"slope {slope:+.2f}")
                axis.legend(loc="upper right")
            axis.set_title(f"gap, {title}")
            axis.set_xlabel("chronological age (years)")
        axes[0].set_ylabel("predicted − chronological age (years)")
        written.append(save_figure(figure, group / "brainage_gap.png", plt))
    return written


def _som_outputs(output_dir: Path, header: list[str], rows: list[list[str]], group: Path,
                 plt) -> list[Path]:
    """The SOM node table's figures and tables (`bids_app_som`), on the model's grid."""
    from hpcbrain.bids_app_som import NodeRow, grid_shape, som_group_outputs

    def cell(row: list[str], name: str) -> str | None:
        return row[3 + header.index(name)] if name in header else None

    nodes, shapes = [], set()
    for row in rows:
        if cell(row, "som_rows") is not None:
            shapes.add((int(cell(row, "som_rows")), int(cell(row, "som_cols"))))
        age = cell(row, "age")
        similarity_file = output_dir / row[2].replace(f"_{SUFFIXES['somnode']}.tsv",
                                                      f"_{SUFFIXES['similarity']}.tsv")
        similarity = (np.array(_read_tsv(similarity_file)[1], dtype=np.float64)
                      if similarity_file.is_file() else None)
        nodes.append(NodeRow(row[0], row[1], int(cell(row, "som_row")),
                             int(cell(row, "som_col")),
                             None if age in (None, "n/a") else float(age), similarity))
    try:
        shape = grid_shape(nodes, shapes)
    except ValueError as exc:
        raise BidsAppError(f"{output_dir}: {exc}") from None
    return som_group_outputs(nodes, shape, group, plt)


def run_group(output_dir: str | Path) -> list[Path]:
    """Group level: tables (and figures) over every participant's files in `output_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    if not (output_dir / "dataset_description.json").is_file():
        raise BidsAppError(f"{output_dir} holds no hpcbrain derivatives: run the participant "
                           f"level first")
    group = output_dir / "group"
    written = []
    for what, table in (("latent", "latents"), ("somnode", "somnodes"),
                        ("brainage", "brainage")):
        files = sorted(output_dir.glob(f"sub-*/**/*_desc-{DESC}_{what}.tsv"))
        if not files:
            continue
        header, rows = None, []
        for path in files:
            head, body = _read_tsv(path)
            header = header or head
            labels = entities(path)
            rows.append([f"sub-{labels['sub']}", f"ses-{labels.get('ses', '01')}",
                         str(path.relative_to(output_dir)), *body[0]])
        written.append(write_table(group / f"{table}.tsv",
                                   ["participant_id", "session_id", "source", *header], rows))
        if what == "somnode":
            written += _som_outputs(output_dir, header, rows, group, plt)
        elif what == "brainage":
            written += _brain_age_figures(header, rows, group, plt)
    if not written:
        raise BidsAppError(f"no participant outputs under {output_dir}")
    return written
