"""`hpcbrain recompress`: the same store with another codec, or the store untouched."""
import numpy as np
import pytest
import zarr

from hpcbrain.cli import main
from hpcbrain.data import recompress
from hpcbrain.data.store import CohortStore


def snapshot(path):
    group = zarr.open_group(str(path), mode="r")
    arrays = {name: group[name][...] for name in group.array_keys()}
    return arrays, dict(group.attrs)["hpcbrain"]


def assert_same_contents(path, before):
    arrays, info = snapshot(path)
    assert sorted(arrays) == sorted(before[0])
    for name, values in before[0].items():
        np.testing.assert_array_equal(arrays[name], values, err_msg=name)
        assert arrays[name].dtype == values.dtype, name
    return info


def test_recompress_round_trip_keeps_every_value(make_store, tmp_path, capsys):
    path = make_store(tmp_path, subjects=3, visits=[2, 3, 1], size=(8, 6, 7), scans_per_shard=4)
    before = snapshot(path)
    assert main(["recompress", str(path), "--codec", "zstd", "--codec-level", "9"]) == 0
    assert "recompressed 6 scans" in capsys.readouterr().out
    info = assert_same_contents(path, before)
    assert info["codec"] == {"name": "zstd", "level": 9} and "recompressed_at" in info
    assert {k: v for k, v in info.items() if k not in ("codec", "recompressed_at")} == \
        {k: v for k, v in before[1].items() if k != "codec"}
    images = zarr.open_group(str(path), mode="r")["images"]
    assert [type(c).__name__ for c in images.compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert images.shards == (4, 8, 6, 7)
    store = CohortStore(path)                         # the fast path reads the zstd layout
    np.testing.assert_array_equal(store.read_image(5), before[0]["images"][5].astype(np.float32))
    assert store._fast_read
    assert main(["recompress", str(path)]) == 0      # back to the default
    assert assert_same_contents(path, before)["codec"] == {"name": "blosc-lz4", "level": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # nothing left beside it


def test_a_failed_recompression_leaves_the_store_as_it_was(make_store, tmp_path, monkeypatch):
    path = make_store(tmp_path, subjects=2, visits=2, size=8)
    before = snapshot(path)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(recompress, "_copy_array", broken)
    with pytest.raises(OSError, match="disk full"):
        recompress.recompress_store(path, "zstd")
    info = assert_same_contents(path, before)
    assert info == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_bad_requests_are_refused_by_name(make_store, tmp_path, capsys):
    path = make_store(tmp_path, subjects=2, visits=2, size=8)
    assert main(["recompress", str(tmp_path / "absent.zarr")]) == 2
    assert "absent.zarr does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recompress", str(path), "--codec", "gzip"])
    old = path.with_name(path.name + recompress.OLD_SUFFIX)
    old.mkdir()
    assert main(["recompress", str(path)]) == 2
    assert f"remove {old}" in capsys.readouterr().err


def test_recompress_keeps_the_ledger_and_an_appended_store_readable(tmp_path):
    """The ledger group travels with the images; an appended store's image_row too."""
    from sources import arriving_in_waves

    from hpcbrain.data.convert import convert_cohort
    from hpcbrain.data.ledger import read_ledger

    show = arriving_in_waves(tmp_path)
    out = tmp_path / "cohort.zarr"
    convert_cohort(show(1), out, 8, scans_per_shard=3, progress=False, qc_report=False)
    convert_cohort(show(2), out, 8, append=True, progress=False, qc_report=False)
    ledger = read_ledger(out)
    images = [CohortStore(out).read_image(i) for i in range(8)]
    assert main(["recompress", str(out), "--codec", "zstd"]) == 0
    assert read_ledger(out) == ledger and len(ledger) == 8
    for i, image in enumerate(images):
        np.testing.assert_array_equal(CohortStore(out).read_image(i), image)
