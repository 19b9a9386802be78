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
