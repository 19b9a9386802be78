"""The cohort store reader: the shard fast path reads exactly what zarr reads."""
import numpy as np
import pytest
import zarr

from hpcbrain.data.store import CohortStore, StoreError, cast_volume


@pytest.mark.parametrize("codec", ["blosc-lz4", "zstd"])
@pytest.mark.parametrize("scans_per_shard", [1, 4, 5])
def test_fast_read_equals_zarr_for_every_scan(make_store, tmp_path, scans_per_shard, codec):
    path = make_store(tmp_path, subjects=4, visits=[3, 2, 1, 3], size=(8, 6, 7),
                      scans_per_shard=scans_per_shard, codec=codec)
    store = CohortStore(path)
    assert store._fast_read is None
    plain = zarr.open_group(str(path), mode="r")["images"]
    for i in range(len(store)):
        volume = store.read_image(i)
        assert volume.dtype == np.float32 and volume.flags.writeable
        np.testing.assert_array_equal(volume, plain[i].astype(np.float32))
        kept = store.read_image(i, dtype=None)             # as stored, to cast on the device
        assert kept.dtype == np.float16
        np.testing.assert_array_equal(kept, plain[i])
    assert store._fast_read, "the converter's layout must take the fast path"


def test_float16_to_float32_cast_is_exact_including_specials():
    values = np.array([0.0, -0.0, 1.5, -65504.0, 6e-8, np.inf, -np.inf, np.nan], np.float16)
    cast = cast_volume(values.reshape(2, 2, 2), np.float32).ravel()
    assert cast.dtype == np.float32
    np.testing.assert_array_equal(cast, values.astype(np.float32))
    assert np.signbit(cast[1])


def test_unwritten_scans_read_as_fill_value(make_store, tmp_path):
    path = make_store(tmp_path, subjects=2, visits=2, size=8, scans_per_shard=2)
    images = zarr.open_group(str(path), mode="r+")["images"]
    images.resize((6, 8, 8, 8))          # scans 4, 5: a shard that was never written
    store = CohortStore(path)
    np.testing.assert_array_equal(store.read_image(5), np.zeros((8, 8, 8), np.float32))


def test_other_layouts_fall_back_to_zarr(make_store, tmp_path):
    path = make_store(tmp_path, subjects=2, visits=2, size=8)
    group = zarr.open_group(str(path), mode="r+")
    data = group["images"][...]
    unsharded = group.create_array("images", shape=data.shape, dtype=data.dtype,
                                   chunks=(1, 8, 8, 8), overwrite=True)
    unsharded[...] = data
    store = CohortStore(path)
    np.testing.assert_array_equal(store.read_image(3), data[3].astype(np.float32))
    assert store._fast_read is False


def test_out_of_range_scan_and_missing_store(make_store, tmp_path):
    store = CohortStore(make_store(tmp_path, subjects=1, visits=2, size=8))
    with pytest.raises(IndexError, match="out of range"):
        store.read_image(2)
    with pytest.raises(StoreError, match="hpcbrain convert"):
        CohortStore(tmp_path / "absent.zarr")
