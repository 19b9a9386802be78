"""What the conversion tests compare stores with: shard files byte for byte, columns, ledgers, and
the scans of two stores whatever their order. `from store_checks import assert_same_store`."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr

from hpcbrain.data.ledger import read_ledger
from hpcbrain.data.store import CohortStore


def shard_bytes(store: Path) -> dict[str, bytes]:
    images = store / "images"
    return {str(p.relative_to(images)): p.read_bytes() for p in sorted(images.rglob("*"))
            if p.is_file()}


def assert_same_store(store: Path, reference: Path) -> None:
    assert shard_bytes(store) == shard_bytes(reference)
    a, b = zarr.open_group(str(store)), zarr.open_group(str(reference))
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in b.array_keys():
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    attrs_a, attrs_b = (dict(g.attrs["hpcbrain"]) for g in (a, b))
    for key in ("created_at", "created_by"):
        attrs_a.pop(key), attrs_b.pop(key)
    assert attrs_a == attrs_b
    keep = ("path", "status", "reason", "template_corr", "store_index")

    def rows(path):       # NaN (a failed scan's metrics) compares unequal to itself
        return [{k: None if isinstance(r[k], float) and np.isnan(r[k]) else r[k] for k in keep}
                for r in read_ledger(path)]

    assert rows(store) == rows(reference)


def shard_hashes(store: Path) -> dict[str, str]:
    shards = store / "images" / "c"
    return {str(p.relative_to(shards)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(shards.rglob("*")) if p.is_file()}


def by_session(store: Path) -> dict[tuple[str, str], dict]:
    """Every scan of the store, keyed by (subject, session): its image and every column."""
    cohort = CohortStore(store)
    group = zarr.open_group(str(store), mode="r")
    names = [n for n in cohort.columns] + ["affine"]
    columns = {n: group[n][...] for n in names}
    out = {}
    for i in range(len(cohort)):
        key = (str(columns["subject"][i]), str(columns["session"][i]))
        out[key] = {"image": cohort.read_image(i, dtype=None),
                    **{n: columns[n][i] for n in names}}
    return out


def assert_same_scans(store: Path, reference: Path) -> None:
    a, b = by_session(store), by_session(reference)
    assert sorted(a) == sorted(b)
    for key in b:
        for name, value in b[key].items():
            if isinstance(value, np.ndarray) or isinstance(value, float | np.floating):
                np.testing.assert_array_equal(a[key][name], value, err_msg=f"{key} {name}")
            else:
                assert str(a[key][name]) == str(value), (key, name)
