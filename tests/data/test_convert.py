"""hpcbrain.data.convert: NIfTI/BIDS → cohort store, on tiny real NIfTI files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from sources import make_bids, phantom, save, write_tsv

from hpcbrain.data import convert, convert_workers
from hpcbrain.data import store as store_module
from hpcbrain.data.convert import ConversionError, convert_cohort
from hpcbrain.data.store import CohortStore

S = 12  # output side used by most tests


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def read_images(path: Path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["images"][...]


def leftovers(out: Path) -> list[Path]:
    return [p for p in (out, out.with_name(out.name + ".partial")) if p.exists()]


def patch_scaling(path: Path, slope: float, inter: float) -> None:
    """Write scl_slope / scl_inter into an uncompressed NIfTI-1 header (offsets 112, 116)."""
    with open(path, "r+b") as f:
        f.seek(112)
        f.write(struct.pack("<ff", slope, inter))


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def test_store_reads_back_with_plain_zarr(tmp_path):
    src = make_bids(tmp_path / "bids", n_subjects=3, n_sessions=2)
    out = tmp_path / "cohort.zarr"
    report = convert_cohort(src, out, S, scans_per_shard=4, progress=False)
    assert report.n_converted == 6 and report.skipped == [] and report.resumed_shards == 0
    assert report.out == out and leftovers(out) == [out]

    group = zarr.open_group(str(out), mode="r")
    images = group["images"]
    assert images.shape == (6, S, S, S)
    assert images.chunks == (1, S, S, S)
    assert images.shards == (4, S, S, S)
    assert images.dtype == np.float16
    blosc, crc = images.compressors               # the default codec, readable by plain zarr,
    assert type(crc).__name__ == "Crc32cCodec"    # then each chunk's checksum
    assert type(blosc).__name__ == "BloscCodec"
    assert (blosc.cname.value, blosc.clevel, blosc.shuffle.value, blosc.typesize) == \
        ("lz4", 5, "shuffle", 2)
    assert sorted(p.name for p in (out / "images" / "c").iterdir()) == ["0", "1"]  # 2 shards
    assert np.isfinite(images[...]).all()

    for name in ("subject", "session", "source_path", "sex", "group", "diagnosis"):
        meta = json.loads((out / name / "zarr.json").read_text())
        assert meta["data_type"] == "string", name  # zarr's variable-length UTF-8
    assert group["subject"][...].tolist() == ["sub-01", "sub-01", "sub-02", "sub-02",
                                              "sub-03", "sub-03"]
    assert group["session"][...].tolist() == ["ses-01", "ses-02"] * 3
    assert group["sex"][...].tolist() == ["F", "F", "M", "M", "F", "F"]
    assert group["age"].dtype == np.float32
    np.testing.assert_allclose(group["age"][...], [62.5, 64, 63.5, 65, 64.5, 66])
    # participants.tsv's (baseline) age is kept under another name; sessions.tsv gives "age"
    np.testing.assert_allclose(group["participant_age"][...], [61, 61, 62, 62, 63, 63])
    adas = group["adas_cog"][...]
    assert adas.dtype == np.float32
    np.testing.assert_array_equal(adas, [10, np.nan, 20, np.nan, 30, np.nan])
    assert group["affine"].shape == (6, 4, 4) and group["affine"].dtype == np.float64
    assert all(Path(p).is_file() for p in group["source_path"][...].tolist())

    info = dict(group.attrs)["hpcbrain"]
    assert info["schema_version"] == 1
    assert info["shape"] == [S, S, S]
    assert info["spacing_mm"] == pytest.approx([14 / S] * 3)  # largest extent 14 mm over S voxels
    assert info["dtype"] == "float16" and info["n_scans"] == 6 and info["skipped"] == []
    assert info["codec"] == {"name": "blosc-lz4", "level": 5}
    assert info["source"] == {"path": str(src), "format": "bids", "bids_filter": None}
    assert info["preprocessing"]["reorient"].startswith("RAS+")
    assert info["preprocessing"]["resample"]["order"] == 1
    assert {"subject", "session", "age", "source_path", "affine", "sex", "group",
            "diagnosis", "adas_cog"} <= set(info["columns"])
    assert "hpcbrain" in info["created_by"]
    assert not (out / convert.PROGRESS_FILE).exists()

    store = CohortStore(out)  # the project's reader agrees
    assert len(store) == 6 and store.shape == (S, S, S)
    assert store.metadata["group"].tolist() == ["MCI", "MCI", "AD", "AD", "CN", "CN"]


def test_zstd_on_request_stores_the_same_voxels(tmp_path):
    src = make_bids(tmp_path / "bids", n_subjects=2, n_sessions=2)
    default = convert_cohort(src, tmp_path / "lz4.zarr", S, progress=False).out
    zstd = convert_cohort(src, tmp_path / "zstd.zarr", S, codec="zstd", codec_level=7,
                          progress=False).out
    images = zarr.open_group(str(zstd), mode="r")["images"]
    assert [type(c).__name__ for c in images.compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert images.compressors[0].level == 7
    assert CohortStore(zstd).info["codec"] == {"name": "zstd", "level": 7}
    np.testing.assert_array_equal(images[...],
                                  zarr.open_group(str(default), mode="r")["images"][...])
    with pytest.raises(ConversionError, match="unknown image codec 'gzip'.*blosc-lz4, zstd"):
        convert_cohort(src, tmp_path / "bad.zarr", S, codec="gzip", progress=False)
    assert not (tmp_path / "bad.zarr").exists()


def test_existing_store_is_never_overwritten(tmp_path):
    src = make_bids(tmp_path / "bids", n_subjects=1, n_sessions=1)
    out = tmp_path / "cohort.zarr"
    convert_cohort(src, out, S, progress=False)
    before = read_images(out)
    with pytest.raises(ConversionError, match="already exists"):
        convert_cohort(src, out, S, progress=False)
    np.testing.assert_array_equal(read_images(out), before)


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def test_orientation_ras_las_lps_and_permuted_give_the_same_array(tmp_path):
    data = phantom((14, 12, 10))
    vox = np.array([1.0, 1.25, 1.5])
    ras = np.diag([*vox, 1.0])
    ras[:3, 3] = [-7, -8, -6]
    n = np.array(data.shape)

    def flipped(axes):
        d, a = data, ras.copy()
        for ax in axes:  # voxel i' = n-1-i along ax: same world positions
            d = np.flip(d, ax)
            a[:3, 3] = a[:3, 3] + a[:3, ax] * (n[ax] - 1)
            a[:3, ax] = -a[:3, ax]
        return np.ascontiguousarray(d), a

    las = flipped([0])
    lps = flipped([0, 1])
    perm = (2, 0, 1)  # voxel axes stored as (S-I, R-L, A-P): axcodes "SRA"
    perm_img = (np.ascontiguousarray(data.transpose(perm)), ras[:, [*perm, 3]])
    files = {"ras": (data, ras), "las": las, "lps": lps, "sra": perm_img}
    rows = []
    for i, (name, (d, a)) in enumerate(files.items()):
        save(tmp_path / f"{name}.nii.gz", d, a)
        rows.append(f"{name}.nii.gz,s{i},ses-01,70")
    assert nib.aff2axcodes(las[1]) == ("L", "A", "S")
    assert nib.aff2axcodes(lps[1]) == ("L", "P", "S")
    assert nib.aff2axcodes(perm_img[1]) == ("S", "R", "A")
    manifest = tmp_path / "scans.csv"
    manifest.write_text("path,subject,session,age\n" + "\n".join(rows) + "\n")
    out = tmp_path / "o.zarr"
    convert_cohort(manifest, out, S, dtype="float32", progress=False)
    images = read_images(out)
    for i in range(1, 4):
        np.testing.assert_array_equal(images[i], images[0], err_msg=list(files)[i])
    affines = zarr.open_group(str(out))["affine"][...]
    for i in range(4):
        np.testing.assert_allclose(affines[i], ras)  # stored affine: RAS+ after reorientation
    # the bright corner (low x, y, z in RAS) stays at low indices
    assert images[0][:S // 2, :S // 2, :S // 2].max() == images[0].max()


def test_scale_slope_and_intercept_are_applied(tmp_path):
    base = np.round(phantom((12, 12, 12))).astype(np.int16)
    save(tmp_path / "float_x2.nii", base.astype(np.float32) * 2)
    save(tmp_path / "int_slope2.nii", base)
    patch_scaling(tmp_path / "int_slope2.nii", 2.0, 0.0)
    save(tmp_path / "float_inv.nii", 500 - 2 * base.astype(np.float32))
    save(tmp_path / "int_inv.nii", base)
    patch_scaling(tmp_path / "int_inv.nii", -2.0, 500.0)
    save(tmp_path / "int_plain.nii", base)
    assert nib.load(tmp_path / "int_slope2.nii").dataobj.slope == 2.0
    names = ["float_x2", "int_slope2", "float_inv", "int_inv", "int_plain"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,age\n" + "".join(f"{n}.nii,{n},50\n" for n in names))
    out = tmp_path / "o.zarr"
    convert_cohort(manifest, out, 12, dtype="float32", progress=False)
    img = dict(zip(names, read_images(out)))
    np.testing.assert_array_equal(img["int_slope2"], img["float_x2"])
    np.testing.assert_array_equal(img["int_inv"], img["float_inv"])
    assert not np.allclose(img["int_inv"], img["int_plain"])  # the negative slope mattered
    assert zarr.open_group(str(out))["session"][...].tolist() == ["ses-01"] * 5


def test_zscore_on_a_hand_checkable_phantom(tmp_path):
    vol = np.zeros((16, 16, 16), np.float32)
    vol[4:8, 4:12, 4:12] = 100  # brain: 256 voxels at 100 and 256 at 200
    vol[8:12, 4:12, 4:12] = 200  # → mean 150, std 50, mask threshold 20
    save(tmp_path / "a.nii.gz", vol)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,session,age\na.nii.gz,p,ses-01,40\n")
    out = tmp_path / "o.zarr"
    convert_cohort(manifest, out, 16, progress=False)  # 16³ at 1 mm: identity resampling
    img = read_images(out).astype(np.float32)[0]
    brain = vol > 0
    np.testing.assert_array_equal(img[4:8, 4:12, 4:12], -1.0)
    np.testing.assert_array_equal(img[8:12, 4:12, 4:12], 1.0)
    np.testing.assert_array_equal(img[~brain], -3.0)  # background: z-scored 0 intensity
    assert img[brain].mean() == pytest.approx(0, abs=1e-6)
    assert img[brain].std() == pytest.approx(1, abs=1e-3)
    info = dict(zarr.open_group(str(out)).attrs)["hpcbrain"]
    assert info["spacing_mm"] == [1.0, 1.0, 1.0]


def test_field_of_view_is_padded_to_a_centred_cube(tmp_path):
    vol = np.zeros((16, 8, 16), np.float32)  # 16 × 8 × 16 mm: y padded by 4 mm each side
    vol[3:13, 1:7, 2:14] = np.random.default_rng(1).uniform(100, 200, (10, 6, 12))
    save(tmp_path / "a.nii.gz", vol)
    (tmp_path / "m.csv").write_text("path,subject,age\na.nii.gz,p,40\n")
    out = tmp_path / "o.zarr"
    convert_cohort(tmp_path / "m.csv", out, 16, dtype="float32", progress=False)
    img = read_images(out)[0]
    fg = vol > 0
    mean, std = vol[fg].mean(dtype=np.float64), vol[fg].std(dtype=np.float64)
    expected = np.full((16, 16, 16), -mean / std, np.float32)
    expected[:, 4:12, :] = np.where(fg, (vol - mean) / std, -mean / std)
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_sessionless_bids_uses_ses01_and_participants_age(tmp_path):
    root = tmp_path / "bids"
    write_tsv(root / "participants.tsv", ["participant_id", "age", "site"],
              [["sub-a", 71.5, "X"], ["sub-b", 80, "Y"]])
    for sub in ("sub-a", "sub-b"):
        save(root / sub / "anat" / f"{sub}_T1w.nii", phantom((12, 12, 12)))
    out = tmp_path / "o.zarr"
    convert_cohort(root, out, 8, progress=False)
    g = zarr.open_group(str(out))
    assert g["session"][...].tolist() == ["ses-01", "ses-01"]
    np.testing.assert_allclose(g["age"][...], [71.5, 80])
    assert g["site"][...].tolist() == ["X", "Y"]


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def make_bad_bids(root: Path) -> dict[str, str]:
    """sub-01 (2 sessions) and sub-08 (4D with a trailing 1) are fine; the rest are bad."""
    shape = (12, 12, 12)
    subjects = [f"sub-{i:02d}" for i in range(1, 9)]
    write_tsv(root / "participants.tsv", ["participant_id", "sex"],
              [[s, "F"] for s in subjects])

    def t1(sub, ses, data=None, suffix="T1w.nii.gz"):
        return save(root / sub / ses / "anat" / f"{sub}_{ses}_{suffix}",
                    phantom(shape) if data is None else data)

    def sessions(sub, rows):
        write_tsv(root / sub / f"{sub}_sessions.tsv", ["session_id", "age"], rows)

    t1("sub-01", "ses-01"), t1("sub-01", "ses-02")
    sessions("sub-01", [["ses-01", 70], ["ses-02", 72]])
    truncated = t1("sub-02", "ses-01")
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    sessions("sub-02", [["ses-01", 70]])
    t1("sub-03", "ses-01", np.stack([phantom(shape)] * 3, axis=-1))
    sessions("sub-03", [["ses-01", 70]])
    t1("sub-04", "ses-01", phantom(shape)[:, :, 5])
    sessions("sub-04", [["ses-01", 70]])
    nan = phantom(shape)
    nan[5, 5, 5] = np.nan
    t1("sub-05", "ses-01", nan)
    sessions("sub-05", [["ses-01", 70]])
    t1("sub-06", "ses-01"), t1("sub-06", "ses-02")
    sessions("sub-06", [["ses-02", "n/a"]])  # ses-01: no row; ses-02: age n/a
    # two acquisitions of one session (repeat runs would be resolved: the lowest is used)
    t1("sub-07", "ses-01", suffix="acq-a_T1w.nii.gz"), t1("sub-07", "ses-01",
                                                          suffix="acq-b_T1w.nii.gz")
    sessions("sub-07", [["ses-01", 70]])
    t1("sub-08", "ses-01", phantom(shape)[..., None])  # (12, 12, 12, 1): squeezed, fine
    sessions("sub-08", [["ses-01", 75]])
    return {"sub-02": "cannot", "sub-03": "several volumes", "sub-04": "2D",
            "sub-05": "NaN", "sub-06": "age", "sub-07": "duplicate"}


def test_every_bad_scan_is_named_in_one_error_and_nothing_is_left(tmp_path):
    expected = make_bad_bids(tmp_path / "bids")
    out = tmp_path / "o.zarr"
    with pytest.raises(ConversionError) as info:
        convert_cohort(tmp_path / "bids", out, 8, scans_per_shard=2, progress=False)
    err = info.value
    assert len(err.bad) == 8  # sub-02..05, sub-06 ×2, sub-07 ×2
    message = str(err)
    assert message.startswith("8 of 11 scans are bad")
    for path, sub, ses, reason in err.bad:
        assert path in message and f"{sub} {ses}" in message
        assert expected[sub] in reason, (sub, reason)
    assert "no row" in message and "missing (empty or n/a)" in message
    assert {b[0].rsplit("/", 1)[1] for b in err.bad if b[1] == "sub-07"} == {
        "sub-07_ses-01_acq-a_T1w.nii.gz", "sub-07_ses-01_acq-b_T1w.nii.gz"}
    assert leftovers(out) == []


def test_bad_image_after_written_shards_leaves_no_partial(tmp_path):
    rows = []
    for i in range(5):
        save(tmp_path / f"s{i}.nii", phantom((12, 12, 12), seed=i))
        rows.append(f"s{i}.nii,s{i},ses-01,60")
    good = (tmp_path / "s4.nii").read_bytes()
    (tmp_path / "s4.nii").write_bytes(good[: len(good) - 500])  # truncated .nii
    rows.append("missing/nowhere.nii.gz,s5,ses-01,60")
    rows.append("s0.nii,s0,ses-01,61")  # the same subject/session again
    (tmp_path / "m.csv").write_text("path,subject,session,age\n" + "\n".join(rows) + "\n")
    out = tmp_path / "o.zarr"
    with pytest.raises(ConversionError) as info:
        convert_cohort(tmp_path / "m.csv", out, 8, scans_per_shard=2, progress=False)
    reasons = {(Path(p).name, sub): r for p, sub, _, r in info.value.bad}
    assert set(reasons) == {("s4.nii", "s4"), ("nowhere.nii.gz", "s5"), ("s0.nii", "s0")}
    assert "truncated" in reasons["s4.nii", "s4"]
    assert "does not exist" in reasons["nowhere.nii.gz", "s5"]
    assert "duplicate" in reasons["s0.nii", "s0"]
    assert leftovers(out) == []

    # only the truncated image is bad: shards get written first, then everything is removed
    (tmp_path / "m.csv").write_text("path,subject,session,age\n" + "\n".join(rows[:5]) + "\n")
    with pytest.raises(ConversionError, match="1 of 5 scans are bad"):
        convert_cohort(tmp_path / "m.csv", out, 8, scans_per_shard=2, progress=False)
    assert leftovers(out) == []


def test_skip_bad_converts_the_rest_and_records_what_was_skipped(tmp_path, capsys):
    make_bad_bids(tmp_path / "bids")
    out = tmp_path / "o.zarr"
    report = convert_cohort(tmp_path / "bids", out, 8, skip_bad=True, scans_per_shard=2,
                            progress=False)
    assert report.n_converted == 3 and len(report.skipped) == 8
    g = zarr.open_group(str(out))
    assert g["subject"][...].tolist() == ["sub-01", "sub-01", "sub-08"]
    assert g["images"].shape == (3, 8, 8, 8)
    assert np.isfinite(g["images"][...]).all() and np.abs(g["images"][2]).max() > 0
    skipped = dict(g.attrs)["hpcbrain"]["skipped"]
    assert len(skipped) == 8
    assert {s["subject"] for s in skipped} == {f"sub-0{i}" for i in range(2, 8)}
    assert all(set(s) == {"path", "subject", "session", "reason"} for s in skipped)
    assert "skipped 8 bad scan(s)" in capsys.readouterr().err
    assert CohortStore(out).info["n_scans"] == 3


def test_nothing_left_to_convert_is_an_error(tmp_path):
    save(tmp_path / "a.nii", np.full((8, 8, 8), 5.0, np.float32))  # constant image
    (tmp_path / "m.csv").write_text("path,subject,age\na.nii,a,50\nb.nii,b,50\n")
    out = tmp_path / "o.zarr"
    with pytest.raises(ConversionError, match="nothing left to convert"):
        convert_cohort(tmp_path / "m.csv", out, 8, skip_bad=True, progress=False)
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------
# atomic, resumable
# --------------------------------------------------------------------------------------------
def test_crash_leaves_no_store_and_rerun_resumes_to_the_clean_result(tmp_path, monkeypatch,
                                                                    capsys):
    src = make_bids(tmp_path / "bids", n_subjects=4, n_sessions=2)  # 8 scans
    clean = tmp_path / "clean.zarr"
    convert_cohort(src, clean, S, scans_per_shard=3, progress=False)

    real = convert_workers._convert_one
    calls = []

    def crashing(*args):
        calls.append(args[0])
        if len(calls) == 7:  # shards 0 and 1 (scans 0-5) are complete
            raise KeyboardInterrupt
        return real(*args)

    out = tmp_path / "o.zarr"
    monkeypatch.setattr(convert_workers, "_convert_one", crashing)
    with pytest.raises(KeyboardInterrupt):
        convert_cohort(src, out, S, scans_per_shard=3, progress=False)
    assert leftovers(out) == [out.with_name("o.zarr.partial")]
    state = json.loads((out.with_name("o.zarr.partial") / convert.PROGRESS_FILE).read_text())
    assert state["shards"] == [0, 1] and state["written"] == 6

    calls.clear()
    report = convert_cohort(src, out, S, scans_per_shard=3, progress=False)
    assert report.resumed_shards == 2 and report.n_converted == 8
    assert len(calls) == 2  # only scans 6 and 7 were processed again
    assert "resuming" in capsys.readouterr().err
    assert leftovers(out) == [out]
    a, b = zarr.open_group(str(out)), zarr.open_group(str(clean))
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in b.array_keys():
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    ia, ib = dict(a.attrs)["hpcbrain"], dict(b.attrs)["hpcbrain"]
    ia.pop("created_at"), ib.pop("created_at")
    assert ia == ib


def test_changed_inputs_start_over(tmp_path, monkeypatch, capsys):
    src = make_bids(tmp_path / "bids", n_subjects=2, n_sessions=2)
    real = convert_workers._convert_one
    calls = []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise SystemExit(1)
        return real(*args)

    out = tmp_path / "o.zarr"
    monkeypatch.setattr(convert_workers, "_convert_one", crashing)
    with pytest.raises(SystemExit):
        convert_cohort(src, out, S, scans_per_shard=2, progress=False)
    monkeypatch.setattr(convert_workers, "_convert_one", real)
    write_tsv(src / "sub-01" / "sub-01_sessions.tsv", ["session_id", "age"],
              [["ses-01", 50], ["ses-02", 51]])  # different metadata → different fingerprint
    report = convert_cohort(src, out, S, scans_per_shard=2, progress=False)
    assert report.resumed_shards == 0 and report.n_converted == 4
    assert "starting over" in capsys.readouterr().err
    np.testing.assert_allclose(zarr.open_group(str(out))["age"][:2], [50, 51])


# --------------------------------------------------------------------------------------------
# manifest, workers
# --------------------------------------------------------------------------------------------
def test_manifest_input_with_relative_paths_and_extra_columns(tmp_path):
    data_dir = tmp_path / "data" / "nested"
    for i in range(3):
        save(data_dir / f"img{i}.nii.gz", phantom((12, 12, 12), seed=i))
    save(tmp_path / "abs.nii", phantom((12, 12, 12), seed=9))
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text(
        "path,subject,session,age,site,mmse,source_path\n"
        "nested/img2.nii.gz,B,ses-1,71,siteA,29,x\n"
        "nested/img0.nii.gz,A,ses-1,70.5,siteB,,y\n"
        "nested/img1.nii.gz,A,ses-2,72,,n/a,z\n"
        f"{tmp_path / 'abs.nii'},C,ses-1,66,siteA,25,w\n")
    out = tmp_path / "o.zarr"
    report = convert_cohort(manifest, out, S, progress=False)
    assert report.n_converted == 4
    g = zarr.open_group(str(out))
    assert g["subject"][...].tolist() == ["B", "A", "A", "C"]  # manifest order
    assert g["session"][...].tolist() == ["ses-1", "ses-1", "ses-2", "ses-1"]
    np.testing.assert_allclose(g["age"][...], [71, 70.5, 72, 66])
    assert g["site"][...].tolist() == ["siteA", "siteB", "", "siteA"]
    np.testing.assert_array_equal(g["mmse"][...], np.array([29, np.nan, np.nan, 25], "f4"))
    assert g["source_path"][...].tolist() == [str(data_dir / "img2.nii.gz"),
                                              str(data_dir / "img0.nii.gz"),
                                              str(data_dir / "img1.nii.gz"),
                                              str(tmp_path / "abs.nii")]
    assert g["extra_source_path"][...].tolist() == ["x", "y", "z", "w"]  # reserved name
    assert dict(g.attrs)["hpcbrain"]["source"]["format"] == "manifest"


def test_two_workers_give_the_same_store_as_one(tmp_path):
    src = make_bids(tmp_path / "bids", n_subjects=3, n_sessions=2)
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    convert_cohort(src, one, S, workers=1, scans_per_shard=4, progress=False)
    report = convert_cohort(src, two, S, workers=2, scans_per_shard=4, progress=False)
    assert report.n_converted == 6
    a, b = zarr.open_group(str(one)), zarr.open_group(str(two))
    for name in a.array_keys():
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


def test_kill_9_midway_then_rerun_resumes(tmp_path):
    """A real SIGKILL (no cleanup code runs) while shards are being written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = []
    for i in range(12):
        save(tmp_path / f"s{i:02d}.nii", phantom((12, 12, 12), seed=i))
        rows.append(f"s{i:02d}.nii,s{i:02d},ses-01,{50 + i}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,session,age\n" + "\n".join(rows) + "\n")
    out = tmp_path / "o.zarr"
    partial = out.with_name("o.zarr.partial")
    script = (
        "import sys, time\n"
        "from hpcbrain.data import convert, convert_workers\n"
        "real = convert_workers._convert_one\n"
        "def slow(*a):\n"
        "    time.sleep(0.15)\n"
        "    return real(*a)\n"
        "convert_workers._convert_one = slow\n"
        "convert.convert_cohort(sys.argv[1], sys.argv[2], 8, scans_per_shard=2, "
        "progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(manifest), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    progress_file = partial / convert.PROGRESS_FILE
    while time.monotonic() < deadline:
        try:
            if len(json.loads(progress_file.read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not out.exists() and partial.exists()
    done = len(json.loads(progress_file.read_text())["shards"])
    assert 2 <= done < 6

    report = convert_cohort(manifest, out, 8, scans_per_shard=2, progress=False)
    assert report.resumed_shards == done and report.n_converted == 12
    clean = tmp_path / "clean.zarr"
    convert_cohort(manifest, clean, 8, scans_per_shard=2, progress=False)
    np.testing.assert_array_equal(read_images(out), read_images(clean))
    assert leftovers(out) == [out]


def test_crash_while_finalising_resumes_with_the_short_last_shard(tmp_path, monkeypatch):
    src = make_bids(tmp_path / "bids", n_subjects=3, n_sessions=1)  # 3 scans, shards of 2 + 1
    clean = tmp_path / "clean.zarr"
    convert_cohort(src, clean, S, scans_per_shard=2, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "o.zarr"
    monkeypatch.setattr(store_module, "write_columns", crash)   # inside CohortStoreWriter.finalise
    with pytest.raises(KeyboardInterrupt):
        convert_cohort(src, out, S, scans_per_shard=2, progress=False)
    monkeypatch.undo()
    assert leftovers(out) == [out.with_name("o.zarr.partial")]
    report = convert_cohort(src, out, S, scans_per_shard=2, progress=False)
    assert report.resumed_shards == 2
    np.testing.assert_array_equal(read_images(out), read_images(clean))
    g = zarr.open_group(str(out))
    np.testing.assert_array_equal(g["affine"][...], zarr.open_group(str(clean))["affine"][...])


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"                  # a zombie has ended; nobody reaped it yet


def _slow_conversion(tmp_path: Path, n: int, workers: int, delay: float = 0.3):
    """A converting subprocess whose scans each take `delay` seconds (workers included)."""
    import subprocess
    import sys

    rows = []
    for i in range(n):
        save(tmp_path / f"s{i:02d}.nii", phantom((12, 12, 12), seed=i))
        rows.append(f"s{i:02d}.nii,s{i:02d},ses-01,{50 + i}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,session,age\n" + "\n".join(rows) + "\n")
    out = tmp_path / "o.zarr"
    script = (
        "import sys, time\n"
        "import nibabel\n"
        "real = nibabel.load\n"
        f"nibabel.load = lambda *a, **k: (time.sleep({delay}), real(*a, **k))[1]\n"
        "from hpcbrain.data import convert, convert_workers\n"
        "if __name__ == '__main__':\n"
        f"    convert.convert_cohort(sys.argv[1], sys.argv[2], 8, workers={workers}, "
        "scans_per_shard=2, progress=False)\n")
    path = tmp_path / "slow_convert.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path), str(manifest), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, manifest, out


def test_a_second_conversion_to_the_same_store_stops_naming_the_first(tmp_path):
    import time

    proc, manifest, out = _slow_conversion(tmp_path, n=12, workers=1)
    try:
        deadline = time.monotonic() + 60
        while not out.with_name("o.zarr.partial").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(ConversionError, match=rf"the conversion to {out} is in use by .* "
                                                  rf"pid {proc.pid} .*another `hpcbrain convert`"):
            convert_cohort(manifest, out, 8, scans_per_shard=2, progress=False)
        assert proc.poll() is None           # the first one goes on, untouched
    finally:
        proc.wait(120)
        proc.stderr.close()
    assert proc.returncode == 0 and out.exists()
    assert not out.with_name("o.zarr.partial.lock").exists()


def test_conversion_workers_end_when_the_converting_process_is_killed(tmp_path):
    import os
    import signal
    import time

    proc, _, _ = _slow_conversion(tmp_path, n=40, workers=2)
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 3:      # two workers and the resource tracker
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the pool did not start"
            time.sleep(0.05)
        children = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in children):
            assert time.monotonic() < deadline, [c for c in children if _alive(c)]
            time.sleep(0.1)
    finally:
        proc.stderr.close()
