"""Preemption at a step boundary: a real SIGTERM (or USR2) stops training after the current step
with a checkpoint of that step, the MLflow run is marked KILLED, and the rerun resumes at the
next step, so no step is trained or logged twice and the parameters are an uninterrupted run's.
Two ranks agree: a signal on one rank stops both after the same step."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import lsor_run_config, run_on_ranks

from hpcbrain.engine import checkpoint
from hpcbrain.engine.stop import StopRequest, TrainingStopped, stop_on_signals
from hpcbrain.engine.trainer import Trainer
from hpcbrain.job import run_training


def test_a_signal_only_marks_the_request_and_the_old_handlers_come_back():
    request = StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(request) as previous:
        assert previous[int(signal.SIGTERM)] is before
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR2)      # handled in this thread, at the next bytecode
        assert request.requested and request.received(signal.SIGUSR2)
        assert request.signal_name == "SIGUSR2"
    assert signal.getsignal(signal.SIGTERM) is before
    stopped = TrainingStopped("SIGTERM", 7, "/runs/x/checkpoints/step-000000007.pt")
    assert stopped.exit_code == 143
    assert "after global step 7" in str(stopped) and "resume at step 8" in str(stopped)


def _signal_after(monkeypatch, global_step: int, signum=signal.SIGTERM):
    """Send `signum` to this process right after training step `global_step` (1-based)."""
    real_step = Trainer._step

    def step(self, batch, epoch, step_in_epoch):
        out = real_step(self, batch, epoch, step_in_epoch)
        if self.progress.global_step + 1 == global_step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "_step", step)


def _method_state(run_dir):
    return checkpoint.load(checkpoint.latest_checkpoint(run_dir))


@pytest.fixture(scope="module")
def tracked_straight_run(tmp_path_factory):
    """The uninterrupted run the stopped ones are compared with (MLflow in a sqlite store)."""
    from conftest import build_age_contrast_store

    root = tmp_path_factory.mktemp("preemption")
    store = build_age_contrast_store(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracked = ("tracking.enabled=true", f"tracking.uri={uri}", "tracking.registered_model=null",
               "tracking.registered_age_model=null")
    return store, root, uri, tracked, run_training(lsor_run_config(store, root / "runs",
                                                                    "straight", *tracked))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid-epoch", "validation"])
def test_sigterm_stops_after_the_step_and_the_rerun_resumes_at_the_next(
        tracked_straight_run, monkeypatch, when):
    """4 epochs of 4 steps, no periodic checkpoints; SIGTERM after step 6 (mid-epoch 2), or
    during the first epoch's validation (stop with the epoch-end checkpoint, step 4)."""
    import mlflow

    store, root, uri, tracked, straight = tracked_straight_run
    handler_before = signal.getsignal(signal.SIGTERM)
    steps = straight.global_step
    assert steps == 16
    name = f"preempted-{when}"
    run_dir = root / "runs" / name
    if when == "mid-epoch":
        stop_after = 6
        _signal_after(monkeypatch, stop_after)
    else:
        stop_after = 4
        real_validate = Trainer.validate

        def validate(self):
            if self.progress.epoch == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_validate(self)

        monkeypatch.setattr(Trainer, "validate", validate)
    cfg = lsor_run_config(store, root / "runs", name, *tracked)
    with pytest.raises(TrainingStopped) as stopped:
        run_training(cfg)
    assert stopped.value.global_step == stop_after and stopped.value.signal_name == "SIGTERM"
    saved = _method_state(run_dir)
    assert saved["global_step"] == stop_after                   # a checkpoint of that step
    expect_progress = (1, 2) if when == "mid-epoch" else (1, 0)   # (epoch, step in it)
    assert (saved["progress"]["epoch"], saved["progress"]["step_in_epoch"]) == expect_progress
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == handler_before     # handlers put back

    monkeypatch.undo()
    resumed = run_training(cfg)
    assert resumed.global_step == steps and resumed.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == list(range(1, steps + 1))         # every step, each once
    epochs = [m.step for m in client.get_metric_history(run_id, "epoch/train_loss")]
    assert sorted(epochs) == [4, 8, 12, 16]
    # the steps before the stop were not retrained: the losses logged match the straight run's
    straight_loss = {m.step: m.value for m in
                     client.get_metric_history(straight.run_id, "train/loss")}
    for metric in client.get_metric_history(run_id, "train/loss"):
        assert metric.value == pytest.approx(straight_loss[metric.step], rel=1e-5, abs=1e-6)
    expected = _method_state(straight.run_dir)["engine"]["method"]
    got = _method_state(resumed.run_dir)["engine"]["method"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# Two ranks: only rank 1 is signalled; both stop after the same step
# ---------------------------------------------------------------------------------------------
STOP_AFTER = 3      # global step; 4 steps per epoch at batch 4 over 2 ranks


def _two_rank_worker(rank: int, store: str, root: str) -> dict:
    from hpcbrain import process_group

    process_group.setup_distributed(require_group=True)
    real_step = Trainer._step

    def step(self, batch, epoch, step_in_epoch):
        out = real_step(self, batch, epoch, step_in_epoch)
        if rank == 1 and self.progress.global_step + 1 == STOP_AFTER:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    overrides = ("engine.name=ddp", "train.channels_last=false")
    result: dict = {}
    try:
        Trainer._step = step
        try:
            run_training(lsor_run_config(store, root, "stopped", *overrides))
        except TrainingStopped as exc:
            result["stopped_at"] = exc.global_step
            result["signal"] = exc.signal_name
        Trainer._step = real_step
        result["resumed"] = run_training(lsor_run_config(store, root, "stopped", *overrides)).global_step
        result["straight"] = run_training(lsor_run_config(store, root, "straight", *overrides)).global_step
        if rank == 0:
            result["stopped"] = _method_state(os.path.join(root, "stopped"))["engine"]["method"]
            result["reference"] = _method_state(os.path.join(root, "straight"))["engine"]["method"]
    finally:
        process_group.teardown()
    return result


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_signal_on_one_rank_stops_both_after_the_same_step(age_contrast_store, tmp_path):
    results = run_on_ranks(_two_rank_worker, tmp_path, str(age_contrast_store),
                           str(tmp_path / "runs"))
    assert [r["stopped_at"] for r in results] == [STOP_AFTER, STOP_AFTER]
    assert [r["signal"] for r in results] == ["SIGTERM", "SIGTERM"]   # rank 0 learns it too
    assert results[0]["resumed"] == results[0]["straight"] == results[1]["resumed"]
    expected, got = results[0]["reference"], results[0]["stopped"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
