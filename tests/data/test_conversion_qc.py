"""The conversion ledger and QC pages: every scan's fate and metrics kept in the store and in
OUT_qc/conversion.tsv, likely failures flagged and listed first, pages that open in a real
browser with every image loaded, and the documented exit codes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hpcbrain.cli import main
from hpcbrain.data.convert import convert_cohort
from hpcbrain.data.ledger import FIELDS, read_ledger
from hpcbrain.data.qc_report import qc_folder_of
from hpcbrain.data.store import CohortStore
from hpcbrain.data.synth import synthesize_cohort

S = 16


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """3 synthetic subjects (12 scans) plus three made bad: sub-004 flipped front to back (a
    wrong orientation the header does not say), sub-005 a truncated file, sub-006 no age."""
    root = tmp_path_factory.mktemp("qc") / "bids"
    synthesize_cohort(root, 3, seed=5, voxel_size_mm=8.0, progress=False, learnability=False)
    source = next((root / "sub-001" / "ses-01" / "anat").glob("*.nii.gz"))
    img = nib.load(source)
    for sub, age in (("sub-004", "70"), ("sub-005", "71"), ("sub-006", "n/a")):
        anat = root / sub / "ses-01" / "anat"
        anat.mkdir(parents=True)
        (root / sub / f"{sub}_sessions.tsv").write_text(
            f"session_id\tage\tdiagnosis\tadas_cog\nses-01\t{age}\tCN\t5\n")
        target = anat / f"{sub}_ses-01_T1w.nii.gz"
        if sub == "sub-004":
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, ::-1].copy(), img.affine,
                                     img.header), target)
        else:
            shutil.copy(source, target)
    truncated = root / "sub-005" / "ses-01" / "anat" / "sub-005_ses-01_T1w.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:400])
    with open(root / "participants.tsv", "a") as handle:
        handle.writelines(f"{s}\tM\tNC\n" for s in ("sub-004", "sub-005", "sub-006"))
    return root


def test_the_ledger_names_every_scan_its_fate_and_its_qc(cohort, tmp_path):
    out = tmp_path / "c.zarr"
    report = convert_cohort(cohort, out, S, skip_bad=True, scans_per_shard=4, progress=False)
    rows = read_ledger(out)
    by_subject = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    assert len(rows) == 12 + 3
    (flipped,), (truncated,), (no_age,) = (by_subject[s] for s in ("sub-004", "sub-005",
                                                                    "sub-006"))
    assert truncated["status"] == "failed" and "cannot" in truncated["reason"]
    assert np.isfinite(truncated["seconds"]) and np.isnan(truncated["template_corr"])
    assert no_age["status"] == "skipped" and "age is missing" in no_age["reason"]
    assert np.isnan(no_age["seconds"])
    # the flipped scan converts (nothing is wrong with the file) but the QC flags it
    assert flipped["status"] == "ok" and flipped["flags"] == "low template correlation"
    good = [r for r in rows if r["subject"] in ("sub-001", "sub-002", "sub-003")]
    assert all(r["status"] == "ok" and not r["flags"] and r["template_corr"] > 0.6
               and 0.05 < r["foreground"] < 0.6 and r["p01"] < r["p50"] < r["p99"]
               for r in good)
    # each ok row points at its scan in the store, every other scan is in the store
    store = CohortStore(out)
    paths = list(store.metadata["source_path"])
    assert len(paths) == report.n_converted == 13
    for row in rows:
        if row["status"] == "ok":
            assert paths[row["store_index"]] == row["path"]
        else:
            assert row["store_index"] == -1 and row["path"] not in paths
    # the same ledger as a TSV in the QC folder beside the store
    qc = qc_folder_of(out)
    assert qc == tmp_path / "c_qc" and report.qc_folder == qc and report.flagged == 1
    lines = (qc / "conversion.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(FIELDS) and len(lines) == 16
    assert "\tfailed\t" in lines[1 + rows.index(truncated)]
    # the index lists the failed scan first, then the flagged one, then skipped, then the rest
    index = (qc / "index.html").read_text()
    order = [index.index(f">{s}</a>") for s in ("sub-005", "sub-004", "sub-006", "sub-001")]
    assert order == sorted(order)
    assert sorted(p.name for p in qc.glob("sub-*.html")) == [f"sub-00{k}.html"
                                                              for k in range(1, 7)]
    assert len(list((qc / "figures").rglob("*.png"))) == 13


def test_a_resumed_conversion_keeps_the_ledger_of_shards_written_before(cohort, tmp_path,
                                                                       monkeypatch):
    from hpcbrain.data import store as store_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "r.zarr"
    monkeypatch.setattr(store_module, "write_columns", crash)   # after every shard is written
    with pytest.raises(KeyboardInterrupt):
        convert_cohort(cohort, out, S, skip_bad=True, scans_per_shard=4, progress=False,
                       qc_report=False)
    monkeypatch.undo()
    report = convert_cohort(cohort, out, S, skip_bad=True, scans_per_shard=4, progress=False,
                            qc_report=False)
    assert report.resumed_shards == 4 and report.qc_folder is None
    rows = read_ledger(out)
    assert [r["status"] for r in rows].count("ok") == 13
    assert all(np.isfinite(r["seconds"]) and np.isfinite(r["template_corr"])
               for r in rows if r["status"] == "ok")
    assert not (out / "hpcbrain_ledger_staging").exists()


def test_exit_codes_say_whether_every_scan_converted(cohort, tmp_path, capsys):
    assert main(["convert", str(cohort), "--out", str(tmp_path / "a.zarr"), "--shape", str(S),
                 "--quiet"]) == 2                   # bad scans, no --skip-bad: nothing written
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "a_qc").exists()
    assert main(["convert", str(cohort), "--out", str(tmp_path / "b.zarr"), "--shape", str(S),
                 "--quiet", "--skip-bad"]) == 3     # converted, two scans left out
    printed = capsys.readouterr().out
    assert f"QC: {tmp_path / 'b_qc' / 'index.html'}" in printed and "1 scans flagged" in printed
    good = tmp_path / "good"
    shutil.copytree(cohort, good)
    for sub in ("sub-004", "sub-005", "sub-006"):
        shutil.rmtree(good / sub)
    assert main(["convert", str(good), "--out", str(tmp_path / "c.zarr"), "--shape", str(S),
                 "--quiet", "--no-qc-report"]) == 0
    assert not (tmp_path / "c_qc").exists()


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is missing under CI: `make test` installs it")
    return found


def test_qc_pages_open_in_a_real_browser_with_every_image_loaded(cohort, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (make test installs it as root)")
    out = tmp_path / "c.zarr"
    convert_cohort(cohort, out, S, skip_bad=True, progress=False)
    qc = qc_folder_of(out)
    pages = sorted(qc.glob("*.html"))
    assert len(pages) == 7
    for page in pages:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120).stdout
        body = re.search(r'<body data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
        assert body, f"{page.name}: the page's image check did not run"
        loaded, total = map(int, body.groups())
        expected = 0 if page.name in ("index.html", "sub-005.html", "sub-006.html") else \
            len(list((qc / "figures" / page.stem).glob("*.png")))
        assert loaded == total == expected, page.name
        for link in re.findall(r'href="([^"#]+)', dom):
            assert (qc / link).is_file(), f"{page.name} links to a missing {link}"
    # a figure gone missing is caught by the page itself
    next((qc / "figures" / "sub-001").glob("*.png")).unlink()
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom",
                          (qc / "sub-001.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "did not load" in dom


def _figures(qc: Path) -> dict[str, bytes]:
    return {str(p.relative_to(qc)): p.read_bytes() for p in sorted(qc.rglob("*.png"))}


def test_figures_drawn_by_the_workers_are_the_reports_own(cohort, tmp_path, monkeypatch):
    """The workers draw each scan's figure as they convert it; the report only links them,
    and they are byte for byte what the report draws from the store."""
    from hpcbrain.data import qc_report

    out = tmp_path / "c.zarr"
    convert_cohort(cohort, out, S, skip_bad=True, scans_per_shard=4, workers=2, progress=False)
    by_workers = _figures(qc_folder_of(out))
    assert len(by_workers) == 13 and not (out / qc_report.DRAWN_FIGURES).exists()
    shutil.rmtree(qc_folder_of(out))                 # no earlier figures to take: draw all
    qc_report.write_qc_report(out, read_ledger(out))
    assert _figures(qc_folder_of(out)) == by_workers

    drawn = []
    real = qc_report.scan_figure
    monkeypatch.setattr(qc_report, "scan_figure", lambda *a: drawn.append(a) or real(*a))
    qc_report.write_qc_report(out, read_ledger(out))   # the same store: its figures are kept
    assert drawn == [] and _figures(qc_folder_of(out)) == by_workers


def test_an_append_draws_the_new_scans_only(tmp_path, monkeypatch):
    from sources import arriving_in_waves

    from hpcbrain.data import qc_report

    show = arriving_in_waves(tmp_path)
    out = tmp_path / "cohort.zarr"
    convert_cohort(show(1), out, 8, scans_per_shard=3, progress=False)
    first = _figures(qc_folder_of(out))
    drawn = []
    real = qc_report.scan_figure
    monkeypatch.setattr(qc_report, "scan_figure",
                        lambda *a, **k: drawn.append(a[3]) or real(*a, **k))   # a[3]: title
    convert_cohort(show(2), out, 8, append=True, progress=False)
    assert sorted(drawn) == [f"sub-0{s} ses-02" for s in range(1, 5)]
    after = _figures(qc_folder_of(out))
    assert len(after) == 8 and {k: after[k] for k in first} == first
