"""A conversion killed (SIGKILL) at seeded points — after a scan is prepared, after a shard
file is written, before an fsync, before a rename — then run again until it ends: the store
equals an uninterrupted conversion's (images byte for byte, every column, the ledger), with
nothing left beside it. Each life is a real process that kills itself at its k-th event of the
drawn kind: no cleanup runs."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from kill_points import KILL_HOOKS
from sources import phantom_manifest

from hpcbrain.data.convert import convert_cohort
from hpcbrain.data.store import CohortStore

SEED = 2613
KILLS = 12
#: a whole life converts 12 scans into 6 shards with ~30 fsyncs and ~20 renames
EVENTS = {"scan": 4, "shard": 3, "fsync": 10, "replace": 6}

KILLED_CONVERSION = r"""
import json, sys
kind, nth, manifest, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
""" + KILL_HOOKS + r"""
import zarr.storage
from hpcbrain.data import convert, convert_workers
real_set, real_one = zarr.storage.LocalStore.set, convert_workers._convert_one
async def set_then_maybe_die(self, key, value):
    await real_set(self, key, value)
    if "/c/" in key:                      # a shard file of an array, not its metadata
        event("shard")
def one(*args):
    out_ = real_one(*args)
    event("scan")
    return out_
zarr.storage.LocalStore.set, convert_workers._convert_one = set_then_maybe_die, one
report = convert.convert_cohort(manifest, out, 8, scans_per_shard=2, progress=False)
print(json.dumps({"converted": report.n_converted, "events": seen}))
"""


def life(manifest: Path, out: Path, kind: str, nth: int):
    return subprocess.run([sys.executable, "-c", KILLED_CONVERSION, kind, str(nth),
                           str(manifest), str(out)], capture_output=True, text=True,
                          timeout=300)


def store_contents(path: Path) -> dict:
    """Every array of the store, its length, and its ledger without the timings."""
    from hpcbrain.data.ledger import read_ledger

    group = zarr.open_group(str(path), mode="r")
    contents: dict = {name: group[name][...] for name in group.array_keys()}
    contents["len"] = len(CohortStore(path))
    contents["ledger"] = [{k: v for k, v in row.items() if k != "seconds"}
                          for row in read_ledger(path)]
    return contents


@pytest.mark.slow
@pytest.mark.minutes
def test_sigkill_at_seeded_points_then_the_same_command_gives_the_uninterrupted_store(
        tmp_path):
    manifest = phantom_manifest(tmp_path, 12, (12, 12, 12))
    clean = convert_cohort(manifest, tmp_path / "clean.zarr", 8, scans_per_shard=2,
                           progress=False).out

    out = tmp_path / "killed.zarr"
    rng = random.Random(SEED)
    plan = [(kind, rng.randint(1, EVENTS[kind])) for kind in rng.choices(sorted(EVENTS), k=KILLS)]
    killed = 0
    for kind, nth in plan:
        ended = life(manifest, out, kind, nth)
        if ended.returncode == -signal.SIGKILL:
            killed += 1
            continue
        assert ended.returncode == 0, ended.stderr[-3000:]
        break
    assert killed >= 10, f"only {killed} of {len(plan)} kills landed: {plan}"
    final = life(manifest, out, "none", 0)
    assert final.returncode == 0, final.stderr[-3000:]

    expected, got = store_contents(clean), store_contents(out)
    assert expected.keys() == got.keys()
    for name in expected:
        if isinstance(expected[name], np.ndarray):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        else:
            assert got[name] == expected[name], name
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("killed"))
    assert beside == ["killed.zarr", "killed_qc"]  # no .partial, no lock, no temporary file
    assert [p.name for p in out.rglob(".*.tmp-*")] == []   # nor inside the store
    assert sorted(p.name for p in (tmp_path / "killed_qc").iterdir()) == \
        sorted(p.name for p in (tmp_path / "clean_qc").iterdir())
