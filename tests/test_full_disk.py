"""A file system that fills up under a run, on a real size-limited tmpfs: training (its metric
spool, its checkpoints) and conversion stop within seconds with one line naming the path, what
was being written and the space free and needed (exit 74); the newest complete checkpoint stays
the newest and nothing half-written is left; once space is freed the same command resumes.

Needs root to mount (CI runs as root; elsewhere the test is skipped, under CI it fails)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lsor_run_config
from small_fs import fill, small_file_system
from sources import phantom_manifest

from hpcbrain import entry
from hpcbrain.disk_space import EXIT_NO_SPACE
from hpcbrain.engine import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.minutes]   # ~30 s: the full tier


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*tmp-*")]


@pytest.mark.parametrize("tracking", [True, False], ids=["spool-fills", "checkpoint-fills"])
def test_training_on_a_full_disk_stops_naming_the_path_and_resumes_once_freed(
        age_contrast_store, tmp_path, capsys, tracking):
    from hpcbrain.engine.trainer import Trainer

    if tracking:
        # the tracking store elsewhere, the spool in the run folder; checkpoints at epoch ends
        # only (steps 4, 8, ...), so the spool's next write is the first to find the disk full
        extra = ["tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.registered_model=null"]
    else:
        extra = ["train.checkpoint_every_steps=2"]
    straight = lsor_run_config(age_contrast_store, tmp_path, "straight", *extra)
    assert entry.train_here([straight]) == 0

    with small_file_system(8) as fs:
        cfg = lsor_run_config(age_contrast_store, fs, "full", *extra)
        real_step = Trainer._step
        filled = {}

        def step(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            if self.progress.global_step == 5 and not filled:   # after the step-4 checkpoint
                filled["at"] = time.monotonic()
                filled["ballast"] = fill(fs)
            return out

        Trainer._step = step
        try:
            from hpcbrain.cli import main  # noqa: F401  (the same path `hpcbrain train` takes)

            try:
                with entry.full_disk_said():
                    entry.train_here([cfg])
                status = 0
            except entry.user_errors() as exc:
                status = entry.report(exc)
        finally:
            Trainer._step = real_step
        stopped_after = time.monotonic() - filled["at"]
        err = capsys.readouterr().err
        # (the progress bar's last state may precede it on its line)
        lines = [line[line.index("error:"):] for line in err.splitlines() if "error:" in line]
        assert status == EXIT_NO_SPACE == 74
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        what = "the metric spool" if tracking else "a checkpoint"
        assert f"out of disk space writing {what} {fs / 'full'}" in lines[0], lines[0]
        assert "free" in lines[0] and "run the same command again" in lines[0]
        assert stopped_after < 10
        # the newest complete checkpoint is the newest, and verifies; nothing half-written
        newest = checkpoint.latest_checkpoint(fs / "full")
        assert newest is not None and checkpoint.load(newest)["progress"]["global_step"] >= 4
        assert temporary_files(fs / "full") == []

        filled["ballast"].unlink()                       # space freed: the same command
        assert entry.train_here([cfg]) == 0
        expected = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "straight"))
        got = checkpoint.load(checkpoint.latest_checkpoint(fs / "full"))
        for key, value in expected["engine"]["method"].items():
            assert torch.equal(got["engine"]["method"][key], value), key


def test_conversion_on_a_full_disk_stops_naming_the_store_and_resumes_once_freed(
        tmp_path, capsys):
    import zarr

    from hpcbrain.cli import main
    from hpcbrain.data import convert_workers

    manifest = phantom_manifest(tmp_path, 12, (24, 24, 24))
    args = ["convert", str(manifest), "--shape", "24", "--scans-per-shard", "2"]
    assert main([*args, "--out", str(tmp_path / "clean.zarr")]) == 0
    capsys.readouterr()

    with small_file_system(4) as fs:
        out = fs / "cohort.zarr"
        real_one = convert_workers._convert_one
        seen = {"scans": 0}

        def one(*a):
            seen["scans"] += 1
            if seen["scans"] == 5:
                seen["ballast"] = fill(fs)
            return real_one(*a)

        convert_workers._convert_one = one
        try:
            status = main([*args, "--out", str(out)])
        finally:
            convert_workers._convert_one = real_one
        err = capsys.readouterr().err
        lines = [line[line.index("error:"):] for line in err.splitlines() if "error:" in line]
        assert status == EXIT_NO_SPACE, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "out of disk space writing" in lines[0] and str(fs) in lines[0], lines[0]
        assert not out.exists() and out.with_name("cohort.zarr.partial").exists()

        seen["ballast"].unlink()
        assert main([*args, "--out", str(out)]) == 0
        np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["images"][...],
                                      zarr.open_group(str(tmp_path / "clean.zarr"),
                                                      mode="r")["images"][...])
