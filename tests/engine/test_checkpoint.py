"""Checkpoint files: names, pruning (torch files and DeepSpeed folders), and the refusal to
resume one engine's checkpoints with another."""
from __future__ import annotations

import pytest

from hpcbrain.engine import checkpoint
from hpcbrain.engine.single import CheckpointMismatchError, SingleEngine


def test_save_keeps_the_newest_two_and_latest_is_the_highest_step(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint.save_atomic({"step": step}, checkpoint.checkpoint_path(tmp_path, step))
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-000000015.pt", "step-000000020.pt"]
    assert checkpoint.load(checkpoint.latest_checkpoint(tmp_path))["step"] == 20
    # each with its checksum; no temporary file is ever left beside them
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000015.pt", "step-000000015.pt.sha256",
        "step-000000020.pt", "step-000000020.pt.sha256"]


def test_deepspeed_pruning_keeps_the_newest_and_never_the_folder_latest_names(tmp_path):
    folder = checkpoint.deepspeed_dir(tmp_path)
    for step in (1, 2, 3, 4):
        (folder / checkpoint.deepspeed_tag(step)).mkdir(parents=True)
    (folder / "latest").write_text(checkpoint.deepspeed_tag(1))   # e.g. a newer save failed
    checkpoint.prune_deepspeed(tmp_path, keep_last=2)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "step-000000001", "step-000000003", "step-000000004"]
    assert checkpoint.latest_deepspeed_tag(tmp_path) == "step-000000001"
    (folder / "latest").write_text("step-000000009")              # names a missing folder
    assert checkpoint.latest_deepspeed_tag(tmp_path) is None


def test_a_single_or_ddp_engine_refuses_a_deepspeed_run_folder(tmp_path):
    engine = SingleEngine.__new__(SingleEngine)     # only load_checkpoint is exercised
    engine.name = "ddp"
    assert engine.load_checkpoint(tmp_path) is None  # nothing there: a fresh run
    folder = checkpoint.deepspeed_dir(tmp_path)
    (folder / "step-000000007").mkdir(parents=True)
    (folder / "latest").write_text("step-000000007")
    with pytest.raises(CheckpointMismatchError, match=r"holds DeepSpeed checkpoints .* but "
                                                     r"engine.name=ddp: resume with "
                                                     r"engine.name=deepspeed"):
        engine.load_checkpoint(tmp_path)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_crafted_pickle_is_refused_and_runs_no_code(tmp_path, monkeypatch):
    import pickle

    import torch

    monkeypatch.chdir(tmp_path)
    path = checkpoint.checkpoint_path(tmp_path, 3)
    path.parent.mkdir(parents=True)
    torch.save({"engine": {}, "trap": _Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"step-000000003.pt: refused to load"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    import torch

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = checkpoint.save_atomic({"rng": [checkpoint.rng_state()]},
                                  checkpoint.checkpoint_path(tmp_path, 1))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.restore_rng_state(checkpoint.load(path)["rng"], rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, caplog):
    for step in (4, 8):
        checkpoint.save_atomic({"step": step}, checkpoint.checkpoint_path(tmp_path, step))
    newest = checkpoint.checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:100])                 # cut short by a full disk
    with caplog.at_level("WARNING", logger="hpcbrain.engine.checkpoint"):
        path, state = checkpoint.load_newest_good(tmp_path)
    assert path.name == "step-000000004.pt" and state["step"] == 4
    assert "step-000000008.pt does not load" in caplog.text
    assert newest.with_name("step-000000008.pt.bad").exists() and not newest.exists()
    assert checkpoint.latest_checkpoint(tmp_path) == path         # the bad one is out of the way


def _two_checkpoints(tmp_path, newest_state=None):
    import torch

    checkpoint.save_atomic({"engine": {"method": {"w": torch.ones(64)}}, "step": 4},
                           checkpoint.checkpoint_path(tmp_path, 4))
    newest = checkpoint.save_atomic(
        newest_state or {"engine": {"method": {"w": torch.full((64,), 2.0)}}, "step": 8},
        checkpoint.checkpoint_path(tmp_path, 8))
    return newest


def test_a_changed_byte_that_still_loads_is_caught_by_the_checksum(tmp_path, caplog):
    import torch

    newest = _two_checkpoints(tmp_path)
    data = bytearray(newest.read_bytes())
    at = data.find(torch.full((64,), 2.0).numpy().tobytes())     # the tensor's storage
    assert at > 0
    data[at + 3] ^= 0x01                                           # one bit in one float
    newest.write_bytes(bytes(data))
    assert checkpoint.load(newest)["step"] == 8                    # torch alone would take it
    with caplog.at_level("WARNING", logger="hpcbrain.engine.checkpoint"):
        path, state = checkpoint.load_newest_good(tmp_path)
    assert state["step"] == 4
    assert "does not match step-000000008.pt.sha256" in caplog.text
    assert newest.with_name("step-000000008.pt.bad").exists()
    assert newest.with_name("step-000000008.pt.bad.sha256").exists()
    assert not checkpoint.checksum_path(newest).exists()


def test_a_checkpoint_without_its_checksum_is_unverifiable_and_set_aside(tmp_path, caplog):
    newest = _two_checkpoints(tmp_path)
    checkpoint.checksum_path(newest).unlink()       # e.g. killed between the rename and it
    with caplog.at_level("WARNING", logger="hpcbrain.engine.checkpoint"):
        path, state = checkpoint.load_newest_good(tmp_path)
    assert state["step"] == 4 and "unverifiable" in caplog.text


def test_non_finite_parameters_are_refused_naming_the_tensor(tmp_path, caplog):
    import torch

    bad = {"net.encoder.0.weight": torch.ones(3), "G": torch.tensor([1.0, float("nan"), 2.0])}
    with pytest.raises(checkpoint.NonFiniteParameterError,
                       match=r"at step 9: G holds 1 non-finite value\(s\) of 3"):
        checkpoint.check_finite_everywhere(bad, "at step 9")
    checkpoint.check_finite({"ok": torch.ones(2), "steps": torch.tensor([3])}, "fine")
    # one written anyway (by an older version, by hand) is set aside on load
    _two_checkpoints(tmp_path, {"engine": {"method": bad}, "step": 8})
    with caplog.at_level("WARNING", logger="hpcbrain.engine.checkpoint"):
        path, state = checkpoint.load_newest_good(tmp_path)
    assert state["step"] == 4 and "G holds 1 non-finite" in caplog.text


@pytest.mark.slow
def test_deepspeeds_loader_refuses_a_crafted_shard_and_runs_no_code(tmp_path, monkeypatch):
    import pickle

    import torch

    from hpcbrain.engine.deepspeed import weights_only_checkpoint_engine

    monkeypatch.chdir(tmp_path)
    shard = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "trap": _Exploit()}, shard)
    loader = weights_only_checkpoint_engine(None)
    with pytest.raises(pickle.UnpicklingError, match=r"mp_rank_00_model_states.pt: refused"):
        loader.load(str(shard))
    assert not (tmp_path / "pwned").exists()
    # what DeepSpeed itself writes (its ZeRO stage enum among plain values) still loads
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)}, shard)
    assert loader.load(str(shard))["zero_stage"] == ZeroStageEnum.gradients
