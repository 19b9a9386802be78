"""QC pages a person can check: ``OUT_qc/`` beside every store ``OUT.zarr`` a conversion writes.

    OUT_qc/index.html          one row per scan: status, QC metrics and flags, the scans that
                               need a look first (failed, then flagged, then skipped), a link each
    OUT_qc/conversion.tsv      the ledger (`hpcbrain.data.ledger`)
    OUT_qc/sub-<label>.html    per participant: each converted scan as the store holds it, three
                               orthogonal slices through its centre with the MNI152 template's
                               brain outline drawn over them (with ``--register`` also the scan
                               before registration), and its intensity histogram
    OUT_qc/figures/…png

Static files that open from disk with no server (relative links only). Figures are drawn with
matplotlib's object API (no pyplot state, safe in worker processes). Each page checks, once
loaded, that every image on it loaded and says so at its top (a moved or half-copied folder
shows as a red line); ``data-images-loaded`` / ``data-images-total`` on ``<body>`` carry the
counts for scripts (the tests read them from headless Chromium).
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcbrain.atomic import atomic_write, write_text_atomic
from hpcbrain.data.ledger import LEDGER_TSV, write_ledger_tsv
from hpcbrain.data.scan_qc import QC_FIELDS, template_volume
from hpcbrain.volume_grid import VolumeGrid

__all__ = ["qc_folder_of", "write_qc_report", "scan_figure", "figure_name", "DRAWN_FIGURES"]

#: Where a conversion's workers (or array tasks) draw the figures as they convert each scan,
#: inside the store's `.partial` folder; the report takes them from there instead of drawing
#: every scan again in one process (0.2 s a scan: hours at 50,000), then the folder is removed.
DRAWN_FIGURES = "hpcbrain_qc_figures"
_FIGURES = "figures"
_STAMP = "store.json"        # in figures/: which store they were drawn from (see write_qc_report)

_CHECK_IMAGES = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok;
  document.body.dataset.imagesTotal = images.length;
  var line = document.getElementById("image-check");
  line.textContent = images.length === 0 ? "" : ok === images.length ? "all " + ok + " images loaded"
      : (images.length - ok) + " of " + images.length + " images did not load: is the folder complete?";
  line.className = ok === images.length ? "ok" : "bad";
});
</script>"""
_STYLE = """<style>
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
td.text, th.text { text-align: left; }
tr.failed { background: #fdd; } tr.flagged { background: #ffe9c7; } tr.skipped { background: #eee; }
.ok { color: #060; } .bad { color: #b00; font-weight: bold; }
figure { margin: 0.5em 0 1.5em 0; } img { max-width: 100%; }
</style>"""


def qc_folder_of(store: str | Path) -> Path:
    """``OUT_qc`` beside ``OUT.zarr`` (the suffix .zarr dropped)."""
    store = Path(store)
    stem = store.name[:-5] if store.name.endswith(".zarr") else store.name
    return store.with_name(f"{stem}_qc")


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>{_STYLE}</head>\n<body>\n"
            f"<p id=\"image-check\">checking images…</p>\n{body}\n{_CHECK_IMAGES}\n</body></html>\n")


def scan_figure(path: Path, volume: np.ndarray, before: np.ndarray | None, title: str,
                grid: VolumeGrid | None = None) -> Path:
    """Slices through the centre of `volume` (and `before`, the scan before registration) with
    the template's brain outline on the store's `grid` (default: the field-of-view grid of the
    volume's shape), and the intensity histogram, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, brain = template_volume(grid if grid is not None else VolumeGrid(volume.shape))
    rows = [("as stored", volume)] + ([("before registration", before)]
                                     if before is not None else [])
    figure = Figure(figsize=(10, 2.6 * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 4, squeeze=False)
    centre = [s // 2 for s in volume.shape]
    for r, (label, data) in enumerate(rows):
        cuts = [(data[centre[0]].T, brain[centre[0]].T, "sagittal"),
                (data[:, centre[1]].T, brain[:, centre[1]].T, "coronal"),
                (data[:, :, centre[2]].T, brain[:, :, centre[2]].T, "axial")]
        for c, (image, outline, name) in enumerate(cuts):
            axis = axes[r, c]
            axis.imshow(image, cmap="gray", origin="lower")
            axis.contour(outline.astype(float), levels=[0.5], colors="r", linewidths=0.8)
            axis.set_title(f"{name}, {label}", fontsize=8)
            axis.set_axis_off()
        axis = axes[r, 3]
        axis.hist(np.asarray(data, np.float32).ravel(), bins=60, color="0.3")
        axis.set_yscale("log")
        axis.set_title("intensities", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=72, bbox_inches="tight")
    return path


def _number(value: Any) -> str:
    return "" if not isinstance(value, (int, float)) or not np.isfinite(value) \
        else f"{value:.3g}"


def _priority(row: dict) -> int:
    return {"failed": 0, "skipped": 2}.get(row["status"], 1 if row["flags"] else 3)


def figure_name(subject: str | None, path) -> str:
    """A converted scan's figure, relative to the figures folder."""
    return f"{subject or 'unknown'}/{_anchor({'path': str(path)})}.png"


def write_qc_report(store_path: str | Path, ledger: Sequence[dict], *, register: bool = False,
                    drawn: Sequence[Path] = ()) -> Path:
    """Write the QC folder of the store at `store_path` from its `ledger`; returns the folder.
    With `register`, each participant page also shows the scans before registration. A scan's
    figure is taken from the first of the `drawn` folders that has it (`figure_name`), or from
    the QC folder being replaced when that was drawn from this very store (its creation time
    recorded in figures/store.json: an append's earlier scans, whose images did not change);
    else it is drawn here."""
    from hpcbrain.data.store import CohortStore

    store = CohortStore(store_path)
    final = qc_folder_of(store_path)
    stamp = json.dumps({"store": str(Path(store_path).resolve()),
                        "created_at": store.info.get("created_at")}, sort_keys=True)
    earlier = final / _FIGURES
    try:
        reuse = [earlier] if (earlier / _STAMP).read_text() == stamp else []
    except OSError:
        reuse = []
    # built beside the final name and swapped in whole: never a mix of two conversions' pages
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_pages(folder, store, store_path, ledger, register,
                     [*map(Path, drawn), *reuse])
        (folder / _FIGURES).mkdir(exist_ok=True)
        write_text_atomic(folder / _FIGURES / _STAMP, stamp)
        _swap_in(folder, final)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return final


def _swap_in(folder: Path, final: Path) -> None:
    folder.chmod(0o755)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(folder, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, final)


def _take_drawn(target: Path, name: str, drawn: Sequence[Path]) -> bool:
    """Link (or copy) figure `name` from the first `drawn` folder that has it to `target`."""
    for source in (d / name for d in drawn):
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            return True
    return False


def _write_pages(folder: Path, store, store_path, ledger: Sequence[dict], register: bool,
                 drawn: Sequence[Path] = ()) -> None:
    from hpcbrain.data.preprocess import BadScanError, load_scan

    write_ledger_tsv(folder / LEDGER_TSV, ledger)
    grid = store.grid
    participants: dict[str, list[dict]] = {}
    for row in ledger:
        participants.setdefault(row["subject"] or "unknown", []).append(row)
    for subject, rows in participants.items():
        sections = []
        for row in rows:
            anchor = _anchor(row)
            heading = (f"<h2 id=\"{anchor}\">{html.escape(row['session'])} — "
                       f"{html.escape(Path(row['path']).name)}</h2>")
            status = f"<p>status <b>{row['status']}</b>"
            if row["reason"]:
                status += f": {html.escape(row['reason'])}"
            if row["flags"]:
                status += f" — <span class=\"bad\">{html.escape(row['flags'])}</span>"
            status += "</p>"
            metrics = ", ".join(f"{k} {_number(row[k])}" for k in QC_FIELDS
                                if _number(row[k]))
            figure = ""
            if row["status"] == "ok":
                png = folder / _FIGURES / figure_name(subject, row["path"])
                if not _take_drawn(png, figure_name(subject, row["path"]), drawn):
                    before = None
                    if register:
                        try:
                            # unregistered: on the field of view of the store's shape
                            before = load_scan(row["path"], VolumeGrid(grid.shape))[0]
                        except BadScanError:
                            before = None
                    scan_figure(png, store.read_image(int(row["store_index"])), before,
                                f"{subject} {row['session']}", grid)
                figure = (f"<figure><img src=\"{png.relative_to(folder).as_posix()}\" "
                          f"alt=\"slices and histogram of {html.escape(anchor)}\">"
                          f"<figcaption>{metrics}</figcaption></figure>")
            sections.append(heading + status + figure)
        body = (f"<h1>{html.escape(subject)}</h1><p><a href=\"index.html\">all scans</a>"
                f" · red outline: the MNI152 template's brain</p>" + "\n".join(sections))
        write_text_atomic(folder / f"{_page_name(subject)}", _page(f"QC {subject}", body))
    write_text_atomic(folder / "index.html", _index(store_path, ledger))


def _anchor(row: dict) -> str:
    stem = Path(row["path"]).name.split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "scan"


def _page_name(subject: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in subject)
    return f"{safe if safe.startswith('sub-') else 'sub-' + safe}.html"


def _index(store_path, ledger: Sequence[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in ledger) for s in ("ok", "failed", "skipped")}
    flagged = sum(bool(r["flags"]) for r in ledger)
    header = "".join(f"<th>{h}</th>" for h in ("#", "participant", "session", "status", *QC_FIELDS,
                                               "seconds"))
    header = header.replace("<th>participant</th>", "<th class=\"text\">participant</th>")
    lines = []
    for rank, row in enumerate(sorted(ledger, key=_priority), start=1):
        kind = row["status"] if row["status"] != "ok" else ("flagged" if row["flags"] else "")
        link = f"{_page_name(row['subject'] or 'unknown')}#{_anchor(row)}"
        note = html.escape(row["reason"] or row["flags"])
        cells = "".join(f"<td>{_number(row[k])}</td>" for k in (*QC_FIELDS, "seconds"))
        lines.append(f"<tr class=\"{kind}\"><td>{rank}</td><td class=\"text\">"
                     f"<a href=\"{link}\">{html.escape(row['subject'])}</a></td>"
                     f"<td class=\"text\">{html.escape(row['session'])}</td>"
                     f"<td class=\"text\">{row['status']}{': ' + note if note else ''}</td>"
                     f"{cells}</tr>")
    body = (f"<h1>Conversion QC: {html.escape(Path(store_path).name)}</h1>"
            f"<p>{counts['ok']} converted, {counts['failed']} failed, {counts['skipped']} "
            f"skipped; {flagged} flagged by the automatic checks. Failed and flagged scans "
            f"come first. The ledger: <a href=\"{LEDGER_TSV}\">{LEDGER_TSV}</a>.</p>"
            f"<table><tr>{header}</tr>\n" + "\n".join(lines) + "</table>")
    return _page("conversion QC", body)
