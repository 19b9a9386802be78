"""A conversion split into blocks (what Slurm array tasks run) gives the one-process store:
the same shard files byte for byte and equal columns, however many blocks, also when a block is
killed mid-way and the command rerun, and when scans fail (--skip-bad)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sources import make_bids
from store_checks import assert_same_store

from hpcbrain.data import convert_blocks
from hpcbrain.data.convert import ConversionError, convert_cohort
from hpcbrain.data.convert_blocks import (
    convert_block,
    finish_conversion,
    plan_conversion,
    unfinished_blocks,
)
from hpcbrain.data.ledger import read_ledger

S = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_bids(tmp_path_factory.mktemp("blocks") / "bids", n_subjects=5, n_sessions=2)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return convert_cohort(source, out, S, scans_per_shard=3, progress=False,
                          qc_report=False).out


@pytest.mark.parametrize("tasks", [1, 3, 10])
def test_any_number_of_blocks_gives_the_one_process_store(source, reference, tmp_path, tasks):
    out = tmp_path / "b.zarr"
    plan = plan_conversion(source, out, S, tasks=tasks, scans_per_shard=3)
    assert len(plan.blocks) == min(tasks, 4)            # 10 scans, shards of 3: 4 shards
    for block in reversed(range(len(plan.blocks))):     # any order
        convert_block(plan, block)
    finish_conversion(plan, qc_report=False)
    assert_same_store(out, reference)
    assert not plan.partial.exists()


def test_a_block_killed_mid_way_is_redone_by_the_same_command(source, reference, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "k.zarr"
    plan = plan_conversion(source, out, S, tasks=2, scans_per_shard=3)   # blocks of 2 shards
    convert_block(plan, 0)
    real_savez, calls = np.savez, []

    def killed_after_one_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt                  # the task dies writing its 2nd marker
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_block(plan, 1)
    monkeypatch.undo()
    with pytest.raises(ConversionError, match=r"1 shards of .* are unfinished \(blocks \[1\]\)"):
        finish_conversion(plan, qc_report=False)
    again = plan_conversion(source, out, S, tasks=2, scans_per_shard=3)   # the same command
    assert again == plan and unfinished_blocks(again) == [1]
    assert convert_block(again, 0) == 0 and convert_block(again, 1) == 1   # only what is left
    finish_conversion(again, qc_report=False)
    assert_same_store(out, reference)


def test_failed_scans_are_packed_out_as_the_one_process_skip_bad_does(source, tmp_path):
    bad_source = tmp_path / "bids"
    shutil.copytree(source, bad_source)
    corrupt = next((bad_source / "sub-02" / "ses-02" / "anat").glob("*.nii.gz"))
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    reference = convert_cohort(bad_source, tmp_path / "ref.zarr", S, scans_per_shard=3,
                               skip_bad=True, progress=False, qc_report=False).out
    out = tmp_path / "b.zarr"
    plan = plan_conversion(bad_source, out, S, tasks=3, scans_per_shard=3, skip_bad=True)
    for block in range(len(plan.blocks)):
        convert_block(plan, block)
    report = finish_conversion(plan)
    assert report.n_converted == 9 and report.qc_folder == tmp_path / "b_qc"
    assert_same_store(out, reference)
    failed = [r for r in read_ledger(out) if r["status"] == "failed"]
    assert [Path(r["path"]).name for r in failed] == [corrupt.name]
    # the shard before the failed scan (scans 0-2) was kept as the task wrote it
    assert (out / "images" / "c" / "0").is_dir()
    # without --skip-bad the failure stops the assembling step and names the scan
    strict = plan_conversion(bad_source, tmp_path / "s.zarr", S, tasks=2, scans_per_shard=3)
    for block in range(len(strict.blocks)):
        convert_block(strict, block)
    with pytest.raises(ConversionError, match=corrupt.name):
        finish_conversion(strict, qc_report=False)


def test_other_inputs_start_over_and_a_finished_store_is_never_overwritten(source, tmp_path,
                                                                           capsys):
    out = tmp_path / "o.zarr"
    plan = plan_conversion(source, out, S, tasks=2, scans_per_shard=3)
    convert_block(plan, 0)
    other = plan_conversion(source, out, S, tasks=2, scans_per_shard=2)
    assert "starting over" in capsys.readouterr().err
    assert unfinished_blocks(other) == [0, 1]
    for block in range(len(other.blocks)):
        convert_block(other, block)
    finish_conversion(other, qc_report=False)
    with pytest.raises(ConversionError, match="already exists"):
        plan_conversion(source, out, S, tasks=2)
    assert convert_blocks.PLAN_FILE not in {p.name for p in out.iterdir()}
