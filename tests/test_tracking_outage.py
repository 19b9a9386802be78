"""Tracking never stops training: the spool and the background sender on their own, a server
that is not there at start (fail fast, or go on offline and send later), and a real MLflow
server killed mid-run and back 20 s later (every step logged exactly once)."""
from __future__ import annotations

import threading
import time

import pytest
from conftest import lsor_run_config
from mlflow_server import MlflowServer, free_port

from hpcbrain.metric_sender import MetricSender
from hpcbrain.metric_spool import MetricRecord, MetricSpool


def records(steps, key="train/loss"):
    return [MetricRecord(key, float(s) / 10, 1_000 + s, s) for s in steps]


# ---------------------------------------------------------------------------------------------
# the spool and the sender
# ---------------------------------------------------------------------------------------------
def test_the_spool_gives_back_what_was_not_sent_and_survives_a_torn_line(tmp_path):
    spool = MetricSpool(tmp_path)
    assert spool.pending() == ([], 0) and len(spool) == 0
    spool.append(records([1, 2, 3]))
    got, lines = spool.pending(limit=2)
    assert [r.step for r in got] == [1, 2] and lines == 2
    spool.mark_sent(lines)
    assert [r.step for r in spool.pending()[0]] == [3] and len(spool) == 1
    with open(spool.path, "a") as handle:          # a crash in the middle of an append
        handle.write('["train/loss", 0.4, 10')
    spool.append(records([4]))
    got, lines = spool.pending()
    assert [r.step for r in got] == [3, 4] and lines == 3   # the torn line is skipped, counted
    spool.mark_sent(lines)
    assert not spool.path.exists() and not spool.sent_path.exists()   # all sent: files gone
    # what was ever handed over is remembered per key, spooled or sent
    assert spool.logged_steps() == {"train/loss": 4}
    spool.append(records([5, 6], key="val/loss") + records([2], key="train/loss"))
    assert spool.logged_steps() == {"train/loss": 4, "val/loss": 6}


class FlakyServer:
    """A send callable that fails while `down` is set and records what it accepted."""

    def __init__(self):
        self.down = threading.Event()
        self.accepted: list[MetricRecord] = []

    def __call__(self, batch):
        if self.down.is_set():
            raise ConnectionError("connection refused")
        self.accepted.extend(batch)


def wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_the_sender_spools_through_an_outage_and_delivers_each_value_once(tmp_path):
    server = FlakyServer()
    sender = MetricSender(server, MetricSpool(tmp_path), queue_size=4, retry_s=0.1)
    sender.submit(records([1, 2]))
    wait_for(lambda: len(server.accepted) == 2)
    assert sender.status() is None
    server.down.set()
    for step in range(3, 30):                      # more batches than the queue holds
        sender.submit(records([step]))
    wait_for(lambda: sender.offline)
    assert "spooled" in sender.status()
    server.down.clear()                            # back: the retry sends the spool
    wait_for(lambda: len(server.accepted) == 29 and not sender.offline)
    assert sender.close(timeout_s=5)
    assert sorted(r.step for r in server.accepted) == list(range(1, 30))
    assert not (tmp_path / "tracking-spool.jsonl").exists()


def test_close_is_bounded_when_a_send_hangs_and_the_rest_waits_for_the_next_run(tmp_path):
    release = threading.Event()
    accepted = []

    def hanging(batch):
        if not release.is_set():
            release.wait(30)
        accepted.extend(batch)

    sender = MetricSender(hanging, MetricSpool(tmp_path), retry_s=0.1)
    sender.submit(records([1]))
    time.sleep(0.2)                               # the sender is now stuck in its send
    sender.submit(records([2, 3]))
    started = time.monotonic()
    assert sender.close(timeout_s=0.5) is False
    assert time.monotonic() - started < 2.0
    release.set()                                 # the stuck send finishes late; step 1 arrives
    # the next run of the same command: a new sender replays what the first one left behind
    server = FlakyServer()
    later = MetricSender(server, MetricSpool(tmp_path), retry_s=0.1)
    assert later.close(timeout_s=5)
    assert {r.step for r in server.accepted} | {r.step for r in accepted} == {1, 2, 3}
    assert [r.step for r in server.accepted if r.step in (2, 3)] == [2, 3]


# ---------------------------------------------------------------------------------------------
# a real MLflow server
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder, free_port())
    yield server
    server.stop()


def tracked(uri: str, *extra: str) -> tuple[str, ...]:
    return ("tracking.enabled=true", f"tracking.uri={uri}", "tracking.registered_model=null",
            "tracking.registered_age_model=null", "tracking.retry_s=0.5", *extra)


@pytest.mark.slow
def test_a_server_that_is_not_there_fails_fast_naming_it(age_contrast_store, tmp_path, capsys):
    from hpcbrain.job import run_training
    from hpcbrain.tracking import TrackingUnavailable

    uri = f"http://127.0.0.1:{free_port()}"          # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"tracking server {uri} does not answer.*"
                                                  r"tracking.on_unreachable=offline"):
        run_training(lsor_run_config(age_contrast_store, tmp_path, "x", *tracked(uri)))
    assert time.monotonic() - started < 60           # seconds, not the ~4 minutes of retries
    assert not list((tmp_path / "x").glob("checkpoints/*.pt"))
    # the command line says it in one line and exits 2, as for other input errors
    from hpcbrain.cli import main

    assert main(["train", "--cfg", "lsor.yaml", "--cfg", "smoke.yaml",
                 f"data.store={age_contrast_store}", "data.input_size=16",
                 f"run.root={tmp_path}", "run.name=cli", *tracked(uri)]) == 2
    assert f"error: tracking server {uri} does not answer" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_training_sends_its_metrics_with_the_next_run(age_contrast_store, tmp_path,
                                                              mlflow_server):
    from mlflow import MlflowClient

    from hpcbrain.job import run_training

    offline = tracked(mlflow_server.uri, "tracking.on_unreachable=offline")
    result = run_training(lsor_run_config(age_contrast_store, tmp_path, "offline-run", *offline))
    assert result.run_id is None and result.global_step == 16
    spool = MetricSpool(tmp_path / "offline-run")
    assert {r.step for r in spool.pending()[0] if r.key == "train/loss"} == set(range(1, 17))

    mlflow_server.start()
    again = run_training(lsor_run_config(age_contrast_store, tmp_path, "offline-run", *offline))
    assert again.global_step == 16 and again.run_id is not None   # nothing retrained
    client = MlflowClient(mlflow_server.uri)
    steps = [m.step for m in client.get_metric_history(again.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 17))
    assert not spool.path.exists()


@pytest.mark.slow
@pytest.mark.minutes
def test_a_server_killed_mid_run_and_back_20_s_later_misses_no_step(age_contrast_store,
                                                                    tmp_path, mlflow_server):
    """Killed after step 3; steps 4-11 train while it is down (spooled); restarted 20 s after
    the kill; step 12 waits for that, so the rest of the run is logged live and the spool is
    sent. Every step of the run is in MLflow exactly once and the run ends FINISHED."""
    from mlflow import MlflowClient

    from hpcbrain.engine.trainer import Trainer
    from hpcbrain.job import run_training

    mlflow_server.start()
    back = threading.Event()
    trained_while_down: list[int] = []
    real_step = Trainer._step

    def restart_later():
        time.sleep(20)
        mlflow_server.start()
        back.set()

    def step(self, batch, epoch, step_in_epoch):
        done = self.progress.global_step          # steps finished before this one
        if done == 3:
            mlflow_server.stop()
            threading.Thread(target=restart_later, daemon=True).start()
        if 3 <= done < 11 and not back.is_set():
            trained_while_down.append(done + 1)
        if done == 11:
            assert back.wait(120), "the server did not come back"
        return real_step(self, batch, epoch, step_in_epoch)

    Trainer._step = step
    try:
        result = run_training(lsor_run_config(age_contrast_store, tmp_path, "outage",
                                              *tracked(mlflow_server.uri)))
    finally:
        Trainer._step = real_step
    assert result.global_step == 16
    assert trained_while_down == list(range(4, 12))   # training went on without the server
    client = MlflowClient(mlflow_server.uri)
    steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 17))         # each step exactly once
    epochs = [m.step for m in client.get_metric_history(result.run_id, "epoch/train_loss")]
    assert sorted(epochs) == [4, 8, 12, 16]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert not (tmp_path / "outage" / "tracking-spool.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# the finishing phase: models, registrations and figures when the server is gone at the end
# ---------------------------------------------------------------------------------------------
def finishing_config(store, root, uri, name="finish"):
    """The tiny LSOR run (4 epochs × 4 steps), its encoder registered as `finish-encoder`; the
    server may be gone at its end for 3 s before the uploads are deferred."""
    return lsor_run_config(store, root, name, *tracked(
        uri, "tracking.registered_model=finish-encoder", "tracking.outage_wait_s=3",
        "tracking.finish_timeout_s=2"))


def kill_server_after_step(server, step: int):
    """Patch the trainer so that the server is killed after `step` steps; returns the undo."""
    from hpcbrain.engine.trainer import Trainer

    real_step = Trainer._step

    def patched(self, batch, epoch, step_in_epoch):
        if self.progress.global_step == step:
            server.stop()
        return real_step(self, batch, epoch, step_in_epoch)

    Trainer._step = patched
    return lambda: setattr(Trainer, "_step", real_step)


def registered_versions(uri: str, name: str):
    from mlflow import MlflowClient

    return MlflowClient(uri).search_model_versions(f"name='{name}'")


@pytest.mark.slow
@pytest.mark.minutes
def test_a_server_gone_before_the_end_defers_the_model_and_the_rerun_registers_it_once(
        age_contrast_store, tmp_path, mlflow_server, capsys):
    """Killed after epoch 2 and not back: training ends, the finishing phase waits its 3 s,
    then says in one line what is deferred and exits 75, no traceback; the next run of the same
    command (server back) registers the encoder once, logs the figures once and each of the
    finishing phase's metrics once; a third run changes nothing."""
    import json

    from mlflow import MlflowClient

    from hpcbrain import entry
    from hpcbrain.publish_ledger import LEDGER_FILE

    mlflow_server.start()
    cfg = finishing_config(age_contrast_store, tmp_path, mlflow_server.uri)
    undo = kill_server_after_step(mlflow_server, 8)
    try:
        status = entry.train_here([cfg])
    finally:
        undo()
    err = capsys.readouterr().err
    assert status == entry.EXIT_DEFERRED == 75
    deferred_lines = [line for line in err.splitlines() if line.startswith("deferred:")]
    assert len(deferred_lines) == 1 and "Traceback" not in err
    assert "model encoder for finish-encoder" in deferred_lines[0]
    assert str(tmp_path / "finish") in deferred_lines[0]
    result = json.loads((tmp_path / "finish" / "result.json").read_text())
    assert result["model_uri"] is None and "model encoder for finish-encoder" in result["deferred"]
    assert (tmp_path / "finish" / LEDGER_FILE).exists()

    mlflow_server.start()                           # back; the same command again
    assert entry.train_here([cfg]) == 0
    out = capsys.readouterr()
    assert "registered model:  models:/finish-encoder@current" in out.out
    assert "deferred:" not in out.err
    versions = registered_versions(mlflow_server.uri, "finish-encoder")
    assert len(versions) == 1
    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias("finish-encoder", "current").version == \
        versions[0].version
    run_id = json.loads((tmp_path / "finish" / "result.json").read_text())["run_id"]
    assert json.loads((tmp_path / "finish" / "result.json").read_text())["deferred"] is None
    figures = [a.path for a in client.list_artifacts(run_id, "figures")]
    assert figures, "the SOM figures were not sent"
    occupied = client.get_metric_history(run_id, "som/occupied_nodes")
    assert [m.step for m in occupied] == [16]       # the finishing metrics once, not per run
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 17))      # the spool sent what the outage held

    assert entry.train_here([cfg]) == 0             # complete: nothing sent again
    assert len(registered_versions(mlflow_server.uri, "finish-encoder")) == 1


@pytest.mark.slow
@pytest.mark.minutes
def test_a_server_back_20_s_into_the_finishing_phase_gets_everything_in_the_same_run(
        age_contrast_store, tmp_path, mlflow_server, capsys):
    """Killed as the finishing phase starts and back 20 s later, inside tracking.outage_wait_s
    (60 s): the same run registers the encoder (one version) and exits 0."""
    from hpcbrain import entry, job

    mlflow_server.start()
    cfg = lsor_run_config(age_contrast_store, tmp_path, "back", *tracked(
        mlflow_server.uri, "tracking.registered_model=back-encoder", "tracking.outage_wait_s=60"))
    real_finish = job.finish_on_rank0

    def restart_later():
        time.sleep(20)
        mlflow_server.start()

    def finish(*args, **kwargs):
        mlflow_server.stop()
        threading.Thread(target=restart_later, daemon=True).start()
        return real_finish(*args, **kwargs)

    job.finish_on_rank0 = finish
    try:
        started = time.monotonic()
        status = entry.train_here([cfg])
    finally:
        job.finish_on_rank0 = real_finish
    assert status == 0, capsys.readouterr().err
    assert time.monotonic() - started < 120
    assert len(registered_versions(mlflow_server.uri, "back-encoder")) == 1
