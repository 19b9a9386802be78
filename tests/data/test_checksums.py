"""Bytes at rest are checked: every image chunk carries a crc32c that hpcbrain's fast reader,
plain zarr and `hpcbrain verify` all check; a flipped byte is named (scan, subject, session,
shard file, store), never trained on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from sources import make_bids

from hpcbrain.cli import main
from hpcbrain.data.convert import convert_cohort
from hpcbrain.data.store import CohortStore, CorruptScanError
from hpcbrain.data.verify import has_chunk_checksums, verify_store


@pytest.fixture
def store(tmp_path) -> Path:
    return convert_cohort(make_bids(tmp_path / "bids", n_subjects=3, n_sessions=2), tmp_path /
                          "c.zarr", 8, scans_per_shard=4, progress=False, qc_report=False).out


def flip_a_byte_of(store: Path, scan: int) -> Path:
    """Flip one byte inside scan `scan`'s compressed chunk; the shard file it is in."""
    cohort = CohortStore(store)
    shard = cohort.shard_file(scan)
    per_shard = int(cohort.images.shards[0])
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * per_shard + 4):-4]), "<u8").reshape(-1, 2)
    offset, nbytes = index[cohort.image_row(scan) % per_shard]
    data[int(offset) + int(nbytes) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard


def test_a_flipped_byte_is_named_by_every_reader(store, capsys):
    cohort = CohortStore(store)
    assert has_chunk_checksums(cohort)
    good = [cohort.read_image(i) for i in range(len(cohort))]
    shard = flip_a_byte_of(store, 5)
    subject, session = (CohortStore(store).column(c)[5] for c in ("subject", "session"))

    fresh = CohortStore(store)
    assert fresh._fast_read is None
    with pytest.raises(CorruptScanError) as caught:        # the fast reader
        fresh.read_image(5)
    for part in (f"scan 5 ({subject} {session})", str(shard), str(store), "hpcbrain verify"):
        assert part in str(caught.value)
    assert fresh._fast_read                                 # it was the fast path that saw it
    for i in (0, 4):                                        # the other scans still read
        np.testing.assert_array_equal(fresh.read_image(i), good[i])

    with pytest.raises(ValueError, match="checksum"):      # plain zarr
        zarr.open_group(str(store), mode="r")["images"][5]
    slow = CohortStore(store)
    slow._fast_read = False                                 # zarr's own path, named the same
    with pytest.raises(CorruptScanError, match=r"scan 5 \("):
        slow.read_image(5)

    report = verify_store(store)                            # the scrub
    assert not report.ok and report.problems == [] and len(report.corrupt) == 1
    assert "scan 5" in report.corrupt[0] and str(shard) in report.corrupt[0]
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "BAD: " in out and f"{subject} {session}" in out


def test_verify_passes_a_good_store_and_finds_a_column_cut_short(store, capsys):
    assert main(["verify", str(store)]) == 0
    assert "all good" in capsys.readouterr().out
    group = zarr.open_group(str(store), mode="r+")
    ages = group["age"][...]
    group.create_array("age", shape=(len(ages) - 1,), dtype=ages.dtype, overwrite=True)[...] = \
        ages[:-1]
    report = verify_store(store)
    assert report.corrupt == [] and any("'age' holds 5 values for 6 scans" in p
                                        for p in report.problems)


def test_a_store_without_chunk_checksums_still_reads_and_recompress_adds_them(store, capsys):
    """Stores made before chunks carried checksums: the fast reader reads them, verify says what
    they lack, recompress adds it."""
    from hpcbrain.data.store import ImageLayout

    cohort = CohortStore(store)
    volumes = np.stack([cohort.read_image(i, None) for i in range(len(cohort))])
    group = zarr.open_group(str(store), mode="r+")
    layout = ImageLayout((8, 8, 8))
    old = group.create_array("images", shape=volumes.shape, dtype="float16",
                             chunks=(1, 8, 8, 8), shards=(4, 8, 8, 8),
                             compressors=layout.compressor(), fill_value=0, overwrite=True)
    old[...] = volumes
    legacy = CohortStore(store)
    assert not has_chunk_checksums(legacy)
    np.testing.assert_array_equal(legacy.read_image(3, None), volumes[3])
    assert legacy._fast_read                                # the old layout keeps its fast path
    assert main(["verify", str(store)]) == 0
    assert "carry no checksums" in capsys.readouterr().out
    assert main(["recompress", str(store)]) == 0
    assert has_chunk_checksums(CohortStore(store))
    np.testing.assert_array_equal(CohortStore(store).read_image(3, None), volumes[3])


def test_skipping_corrupt_scans_replaces_their_items_and_names_them_once(store):
    """data.on_corrupt_scan=skip at the dataset: the item with the corrupt scan is replaced by
    the next readable one, in the main process and in loader workers alike, and the scan is
    written to the log once per meeting."""
    import torch

    from hpcbrain.data.datasets import PairDataset, ScanDataset

    flip_a_byte_of(store, 5)
    scans = ScanDataset(store)
    with pytest.raises(CorruptScanError, match="data.on_corrupt_scan=skip"):
        scans[5]                                           # the default: the read stops
    log = store.parent / "corrupt-scans.tsv"
    scans.skip_corrupt_scans(log)
    assert int(scans[5]["index"]) == 0                     # the next item, wrapping around
    loader = torch.utils.data.DataLoader(scans, batch_size=2, num_workers=2)
    indices = torch.cat([batch["index"] for batch in loader]).tolist()
    assert indices == [0, 1, 2, 3, 4, 0]                   # every batch whole, scan 5 not in it
    met = scans.corrupt_scans_met()
    assert list(met) == [5] and "scan 5" in met[5]
    assert len(log.read_text().splitlines()) == 2          # met twice (here, in a worker)
    pairs = PairDataset(store)
    pairs.skip_corrupt_scans(log)
    assert all(5 not in (int(p["index_u"]), int(p["index_v"])) for p in pairs)


@pytest.mark.slow
def test_training_skips_a_corrupt_scan_when_asked_and_stops_naming_it_otherwise(
        age_contrast_store, tmp_path, caplog):
    from conftest import lsor_run_config

    from hpcbrain.job import CORRUPT_SCANS_FILE, run_training

    flip_a_byte_of(age_contrast_store, 7)
    with pytest.raises(CorruptScanError, match=r"scan 7 \("):
        run_training(lsor_run_config(age_contrast_store, tmp_path, "stops"))
    with caplog.at_level("WARNING", logger="hpcbrain.engine.trainer"):
        result = run_training(lsor_run_config(age_contrast_store, tmp_path, "skips",
                                              "data.on_corrupt_scan=skip"))
    assert result.global_step == 16
    named = [r.getMessage() for r in caplog.records if "corrupt scan(s) skipped" in r.getMessage()]
    assert len(named) == 1 and "scan 7 (" in named[0]      # once, at the first epoch's end
    assert {line.split("\t")[0] for line in
            (tmp_path / "skips" / CORRUPT_SCANS_FILE).read_text().splitlines()} == {"7"}


def test_repair_reconverts_the_corrupt_scans_from_their_sources(store, capsys):
    """Two scans of one shard and one of another flipped: `convert --repair` re-converts them,
    the store then equals what it was before, byte for byte, verify passes, the intact scans'
    shard files are untouched, and a second repair has nothing to do."""
    import hashlib

    before = zarr.open_group(str(store), mode="r")["images"][...]
    cohort = CohortStore(store)
    untouched = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in {cohort.shard_file(i) for i in range(len(cohort))}
                 - {cohort.shard_file(i) for i in (1, 2, 5)}}
    for scan in (1, 2, 5):
        flip_a_byte_of(store, scan)
    assert main(["convert", "--repair", str(store)]) == 0
    out = capsys.readouterr().out
    assert "repaired 3 corrupt scan(s)" in out
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["images"][...], before)
    assert verify_store(store).ok
    for path, digest in untouched.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not list(store.parent.glob("*.repair*"))
    assert main(["convert", "--repair", str(store)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_refuses_when_the_sources_changed_or_are_gone(store, capsys):
    cohort = CohortStore(store)
    flip_a_byte_of(store, 1)
    shard = cohort.shard_file(1)
    corrupt = shard.read_bytes()
    witness = Path(cohort.column("source_path")[0])        # an intact scan of that shard
    import nibabel as nib

    original = witness.read_bytes()
    image = nib.load(witness)
    nib.save(nib.Nifti1Image(np.roll(np.asarray(image.dataobj), 2, axis=0), image.affine),
             witness)                                       # not what was converted
    assert main(["convert", "--repair", str(store)]) == 2
    assert "converts today to other voxels" in capsys.readouterr().err
    assert shard.read_bytes() == corrupt                   # nothing replaced
    witness.write_bytes(original)
    Path(cohort.column("source_path")[1]).unlink()
    assert main(["convert", "--repair", str(store)]) == 2
    assert "its source" in capsys.readouterr().err and shard.read_bytes() == corrupt
    assert main(["convert", str(store), "--repair", str(store)]) == 2
    assert "takes no SOURCE" in capsys.readouterr().err
