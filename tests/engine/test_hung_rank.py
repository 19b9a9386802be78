"""A rank that stops or hangs is noticed: the others fail fast, naming the collective, instead
of waiting for the start-up timeout (two gloo processes)."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import run_on_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _worker(rank: int, rank1_does: str) -> dict:
    from hpcbrain import dist, process_group

    process_group.setup_distributed(timeout_minutes=5)
    try:
        dist.all_reduce_sum(torch.ones(1))              # both ranks are up
        dist.set_timeout(0.05)                           # 3 s, as a step timeout would be
        if rank == 1:
            if rank1_does == "hang":
                time.sleep(15)                           # alive but never joins
            return {}                                    # "stop": leaves, closing its sockets
        started = time.perf_counter()
        try:
            dist.all_reduce_sum(torch.ones(1))
        except dist.CollectiveFailed as exc:
            return {"message": str(exc), "seconds": time.perf_counter() - started}
        return {"message": None}
    finally:
        process_group.teardown()


@pytest.mark.parametrize("rank1_does", ["hang", "stop"])
def test_the_surviving_rank_fails_fast_naming_the_collective(tmp_path, rank1_does):
    survivor = run_on_ranks(_worker, tmp_path, rank1_does, world=2)[0]
    assert survivor["message"] is not None, "rank 0 waited instead of failing"
    assert "all_reduce_sum" in survivor["message"] and "within 0.05 min" in survivor["message"]
    assert "another rank stopped, hung or is far behind" in survivor["message"]
    assert survivor["seconds"] < 10         # the step timeout (3 s), not the 5-minute start-up one


#: where a rank hangs: (the class, its method that rank 1 enters 25 s late, the phase named)
PHASES = {
    "validation": ("hpcbrain.engine.trainer:Trainer", "validate", "during validation"),
    "checkpoint": ("hpcbrain.engine.trainer:Trainer", "save_checkpoint", "during a checkpoint"),
    "epoch end": ("hpcbrain.methods.lsor:LSOR", "on_epoch_end", "during the method's epoch end"),
}


def _hung_phase_worker(rank: int, store: str, root: str, phase: str) -> dict:
    """Two DDP ranks train; rank 1 hangs for 25 s as `phase` starts (the first time)."""
    import importlib
    import time as clock

    from conftest import lsor_run_config

    from hpcbrain import dist, process_group
    from hpcbrain.job import run_training

    module, owner = PHASES[phase][0].split(":")
    cls = getattr(importlib.import_module(module), owner)
    name = PHASES[phase][1]
    process_group.setup_distributed(require_group=True, timeout_minutes=5)
    real = getattr(cls, name)
    started: dict = {}

    def late(self, *args, **kwargs):
        if "at" not in started:
            started["at"] = clock.perf_counter()
            if rank == 1:
                clock.sleep(25)                  # alive but not joining: a hung rank
        return real(self, *args, **kwargs)

    setattr(cls, name, late)
    try:
        run_training(lsor_run_config(store, root, "hung", "engine.name=ddp",
                                     "train.channels_last=false", "engine.timeout_minutes=5",
                                     "engine.step_timeout_minutes=0.05"))
        return {"message": None}
    except dist.CollectiveFailed as exc:
        return {"message": str(exc), "seconds": clock.perf_counter() - started["at"]}
    except Exception as exc:  # noqa: BLE001 - rank 1 finds rank 0 gone, however it says so
        return {"message": f"{type(exc).__name__}: {exc}", "seconds": None}
    finally:
        setattr(cls, name, real)
        process_group.teardown()


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_a_rank_hung_after_the_first_step_is_noticed_within_the_step_timeout(
        age_contrast_store, tmp_path, phase):
    """Validation, the method's epoch end and checkpoints run under the step timeout (3 s
    here), not the 5-minute long one, and the failure names the phase."""
    survivor = run_on_ranks(_hung_phase_worker, tmp_path, str(age_contrast_store),
                            str(tmp_path / "runs"), phase, world=2)[0]
    assert survivor["message"] is not None, "rank 0 waited instead of failing"
    assert PHASES[phase][2] in survivor["message"]
    assert "within 0.05 min" in survivor["message"]
    assert survivor["seconds"] < 20         # the step timeout, not the 5-minute one
