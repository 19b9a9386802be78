import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpcbrain.data.datasets import PairDataset, ScanDataset, item_generator
from hpcbrain.data.store import CohortStore
from hpcbrain.data.transforms import Compose, Cutout, GaussianNoise, HemisphereFlip, RandomAffine

# Hand-made cohort: sub-001 has 3 visits stored out of age order, sub-002 has 3 visits two of
# which share an age, sub-003 has a single visit.
AGES = [70.0, 72.5, 71.0,      # sub-001: scans 0, 1, 2 → age order 0, 2, 1
        80.0, 80.0, 81.25,     # sub-002: scans 3, 4 same age, then 5
        65.0]                  # sub-003: scan 6


@pytest.fixture
def cohort(tmp_path, make_store):
    return CohortStore(make_store(tmp_path, subjects=3, visits=[3, 3, 1], size=8, ages=AGES))


def augmentation():
    return Compose([HemisphereFlip(p=0.5), RandomAffine(8.0, 1.0, p=0.8), Cutout(3, p=0.5),
                    GaussianNoise(0.1, p=1.0)])


def as_rows(pairs):
    return [tuple(int(i) for i in row) for row in pairs]


# --- pair enumeration ---------------------------------------------------------------------------
def test_all_pairs_ordered_by_age_with_exact_dt(cohort):
    ds = PairDataset(cohort)
    assert as_rows(ds.pairs) == [(0, 2), (0, 1), (2, 1), (3, 5), (4, 5)]
    assert ds.dt.tolist() == [1.0, 2.5, 1.5, 1.25, 1.25]
    assert ds.n_same_age_dropped == 1  # (3, 4)
    assert ds.scan_indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.pairs.dtype == np.int64 and ds.pairs.shape == (5, 2)


def test_consecutive_pairs(cohort):
    ds = PairDataset(cohort, consecutive_only=True)
    # sub-001: 3 visits → 2 pairs; sub-002: (3, 4) has Δt = 0 and is dropped.
    assert as_rows(ds.pairs) == [(0, 2), (2, 1), (4, 5)]
    assert ds.dt.tolist() == [1.0, 1.5, 1.25]
    assert ds.n_same_age_dropped == 1


def test_only_scans_in_indices_are_paired(cohort):
    ds = PairDataset(cohort, indices=[0, 1, 3, 4, 6])
    assert as_rows(ds.pairs) == [(0, 1)]
    assert ds.scan_indices.tolist() == [0, 1]
    assert ds.n_same_age_dropped == 1


def test_scans_without_age_are_left_out(tmp_path, make_store):
    ages = [70.0, np.nan, 72.0, 73.0]
    ds = PairDataset(make_store(tmp_path, subjects=1, visits=4, ages=ages))
    assert as_rows(ds.pairs) == [(0, 2), (0, 3), (2, 3)]
    assert ds.n_missing_age == 1


def test_pair_items_read_back_the_store(cohort):
    ds = PairDataset(cohort)
    images = cohort.images[...].astype(np.float32)
    item = ds[1]  # pair (0, 1)
    assert item["x_u"].shape == (1, 8, 8, 8) and item["x_u"].dtype == torch.float32
    assert np.array_equal(item["x_u"][0].numpy(), images[0])
    assert np.array_equal(item["x_v"][0].numpy(), images[1])
    assert item["dt"].dtype == torch.float32 and float(item["dt"]) == 2.5
    assert float(item["age_u"]) == 70.0 and float(item["age_v"]) == 72.5
    assert item["index_u"].dtype == torch.int64 and int(item["index_u"]) == 0
    assert int(item["index_v"]) == 1


# --- single scans -----------------------------------------------------------------------------
def test_scan_items_read_back_the_store(cohort):
    images = cohort.images[...].astype(np.float32)
    ds = ScanDataset(str(cohort.path), indices=[5, 0, 2])
    assert len(ds) == 3
    for position, scan in enumerate([5, 0, 2]):
        item = ds[position]
        assert item["x"].shape == (1, 8, 8, 8) and item["x"].dtype == torch.float32
        assert np.array_equal(item["x"][0].numpy(), images[scan])
        assert item["age"].dtype == torch.float32 and float(item["age"]) == AGES[scan]
        assert item["index"].dtype == torch.int64 and int(item["index"]) == scan
    assert int(ds[-1]["index"]) == 2


def test_bad_indices_raise(cohort):
    with pytest.raises(IndexError, match="out of range"):
        ScanDataset(cohort, indices=[0, 7])
    with pytest.raises(ValueError, match="integer"):
        PairDataset(cohort, indices=[0.5, 1.0])
    with pytest.raises(IndexError):
        ScanDataset(cohort)[7]


# --- augmentation determinism -------------------------------------------------------------------
def test_set_epoch_changes_augmentation_and_same_epoch_reproduces(cohort):
    ds = ScanDataset(cohort, transform=augmentation(), seed=3)
    first = ds[2]["x"]
    assert torch.equal(ds[2]["x"], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["x"], first)
    ds.set_epoch(0)
    assert torch.equal(ds[2]["x"], first)
    assert not torch.equal(ScanDataset(cohort, transform=augmentation(), seed=4)[2]["x"], first)


def test_item_generator_depends_on_seed_epoch_and_index():
    draws = {(s, e, i): torch.rand(4, generator=item_generator(s, e, i)).tolist()
             for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert torch.rand(4, generator=item_generator(1, 1, 1)).tolist() == draws[(1, 1, 1)]


def test_pair_augmentation_is_identical_for_u_and_v(tmp_path, make_store):
    # Every scan of a subject holds the same image, so identical augmentation ⇔ x_u == x_v.
    base = np.random.default_rng(0).standard_normal((2, 8, 8, 8), dtype=np.float32)
    path = make_store(tmp_path, subjects=2, visits=3, images=np.repeat(base, 3, axis=0))
    ds = PairDataset(path, transform=augmentation(), seed=1)
    plain = PairDataset(path)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            item = ds[k]
            assert torch.equal(item["x_u"], item["x_v"])
            assert not torch.equal(item["x_u"], plain[k]["x_u"])  # noise p=1: augmented


def test_pair_augmentation_replays_plain_callables(tmp_path, make_store):
    def noisy(x, generator):  # no apply_pair: the dataset replays the generator state
        return x + torch.randn(x.shape, generator=generator)

    base = np.zeros((1, 8, 8, 8), dtype=np.float32)
    ds = PairDataset(make_store(tmp_path, subjects=1, visits=2, images=np.repeat(base, 2, 0)),
                     transform=noisy)
    item = ds[0]
    assert torch.equal(item["x_u"], item["x_v"]) and float(item["x_u"].abs().sum()) > 0


# --- workers ------------------------------------------------------------------------------------
def batches(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_pickles_without_zarr_handle_and_reads_after(cohort):
    ds = PairDataset(cohort, transform=augmentation())
    ds[0]  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._cohort._group is None
    assert_same_batches([clone[0]], [ds[0]])


@pytest.mark.parametrize("kind", ["scans", "pairs"])
def test_two_workers_give_the_same_batches_as_none(cohort, kind):
    def make():
        if kind == "scans":
            return ScanDataset(cohort, transform=augmentation(), seed=2)
        return PairDataset(cohort, transform=augmentation(), seed=2)

    serial = batches(DataLoader(make(), batch_size=2, num_workers=0))
    parallel = batches(DataLoader(make(), batch_size=2, num_workers=2))
    assert_same_batches(serial, parallel)


def test_persistent_workers_follow_set_epoch(cohort):
    reference = ScanDataset(cohort, transform=augmentation(), seed=5)
    expected = []
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        expected.append(batches(DataLoader(reference, batch_size=3)))

    ds = ScanDataset(cohort, transform=augmentation(), seed=5)
    loader = DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert_same_batches(batches(loader), expected[epoch])
    assert not torch.equal(expected[0][0]["x"], expected[1][0]["x"])


def test_without_augmentation_returns_plain_items_and_leaves_original_augmented(make_store, tmp_path):
    from hpcbrain.data.datasets import PairDataset
    from hpcbrain.data.transforms import GaussianNoise

    store = make_store(tmp_path, subjects=2, visits=3, size=8)
    augmented = PairDataset(store, transform=GaussianNoise(std=1.0), seed=3)
    plain = augmented.without_augmentation()
    raw = PairDataset(store)
    assert torch.equal(plain[0]["x_u"], raw[0]["x_u"])
    assert not torch.equal(augmented[0]["x_u"], raw[0]["x_u"])
    assert augmented.transform is not None


@pytest.mark.parametrize("kind", ["scans", "pairs"])
def test_device_augmentation_gives_the_batches_the_workers_gave(cohort, kind):
    """data.augment_on=device: the loader yields plain volumes with their keys, and
    BatchAugmentation on the batch reproduces what per-item augmentation in the workers gave,
    epoch by epoch (both scans of a pair alike)."""
    from hpcbrain.data.batch_augment import AUGMENT_KEY, BatchAugmentation

    make = ScanDataset if kind == "scans" else PairDataset
    in_workers = make(cohort, transform=augmentation(), seed=4)
    on_device = make(cohort, transform=augmentation(), seed=4, augment_on_device=True)
    plain = make(cohort)
    apply = BatchAugmentation(on_device.transform, on_device.seed)
    volumes = ["x"] if kind == "scans" else ["x_u", "x_v"]
    for epoch in (0, 3):
        in_workers.set_epoch(epoch)
        on_device.set_epoch(epoch)
        expected = next(iter(DataLoader(in_workers, batch_size=len(in_workers))))
        raw = next(iter(DataLoader(on_device, batch_size=len(on_device))))
        for key in volumes:                     # the workers only read
            torch.testing.assert_close(raw[key], next(iter(DataLoader(plain, batch_size=99)))[key])
        assert raw[AUGMENT_KEY].tolist() == [[epoch, i] for i in range(len(on_device))]
        augmented = apply(raw)
        assert AUGMENT_KEY not in augmented and set(augmented) == set(expected)
        for key in expected:
            torch.testing.assert_close(augmented[key], expected[key], rtol=0, atol=1e-5)
    # un-augmented views (k-means encoding, validation) carry no key and pass through
    item = on_device.without_augmentation()[0]
    assert AUGMENT_KEY not in item and apply({"x": item[volumes[0]][None]}).keys() == {"x"}
