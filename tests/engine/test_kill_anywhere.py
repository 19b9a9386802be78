"""SIGKILL at seeded points all over a training run — after a step, before an fsync (a
checkpoint's temporary file, the metric spool, the publish ledger, the run's config), before a
rename, after a model upload the ledger has not recorded — then the same command again until
it ends: the final parameters equal an uninterrupted run's bit for bit, every logged step has one
value, and the encoder is registered once.

Each life of the run is a real process (`KILLED_RUN` below) that kills itself with SIGKILL at its
k-th event of the chosen kind: no `finally`, no atexit, no flush — what a node losing power
leaves. The points are drawn from `random.Random(SEED)`: `TRAINING_KILLS` lives die in
training, `UPLOAD_KILLS` in the finishing phase; at least 10 must land (a life that outruns its
kill point ends the run early).

Metrics: a step retrained after a kill is not logged again — the first value stays (the
tracker's per-key watermark, `MetricSpool.logged_steps`); on a CPU with fixed seeds it equals the
retrained one, which the comparison with the uninterrupted run's history shows."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_points import KILL_HOOKS

from hpcbrain.engine import checkpoint

SEED = 2612
#: kinds of event a life dies at in training, and how far into the life the k-th is drawn
#: from: a whole life of this run has 32 steps, ~210 fsyncs, ~90 renames and 7 uploads, so a
#: life gets a few steps further than the last one's checkpoint, or none
TRAINING_EVENTS = {"step": 3, "fsync": 25, "replace": 10}
TRAINING_KILLS = 10
#: then lives that finish training and die in the finishing phase, after an upload
UPLOAD_KILLS = 3

KILLED_RUN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
kind, nth, overrides = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
""" + KILL_HOOKS + r"""
from hpcbrain.engine.trainer import Trainer
from hpcbrain.publish_ledger import PublishLedger
real_step, real_send = Trainer._step, PublishLedger.send
def step(self, *args, **kwargs):
    out = real_step(self, *args, **kwargs)
    event("step")
    return out
def send(self, item, upload):
    def upload_then_maybe_die():
        value = upload()
        event("upload")           # the server has it, the ledger does not know yet
        return value
    return real_send(self, item, upload_then_maybe_die)
Trainer._step, PublishLedger.send = step, send

from conftest import lsor_run_config
from hpcbrain.job import run_training
result = run_training(lsor_run_config(*overrides))
print(json.dumps({"global_step": result.global_step, "model_uri": result.model_uri,
                  "events": seen}))
"""


def life(store, root: Path, name: str, extra: list[str], kind: str, nth: int):
    tests = Path(__file__).resolve().parents[1]
    args = json.dumps([str(store), str(root), name, *extra])
    return subprocess.run([sys.executable, "-c", KILLED_RUN, str(tests), kind, str(nth), args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.minutes
def test_sigkill_at_seeded_points_everywhere_then_the_same_command_equals_an_uninterrupted_run(
        age_contrast_store, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = ["train.epochs=8", "train.checkpoint_every_steps=2", "tracking.enabled=true",
             f"tracking.uri={uri}",
             "tracking.registered_model=killed-encoder"]
    # the uninterrupted run is a life too, never killed: the same process set-up as the others
    # (a pytest process may hold another torch thread count, left by an earlier test, and a
    # different count sums in another order: not bit-equal)
    ended = life(age_contrast_store, tmp_path, "straight",
                 [*extra[:-1], "tracking.registered_model=straight-encoder"], "none", 0)
    assert ended.returncode == 0, ended.stderr[-3000:]
    straight = json.loads(ended.stdout.strip().splitlines()[-1])
    straight_dir = tmp_path / "straight"
    straight_run_id = (straight_dir / "mlflow_run_id").read_text().strip()

    rng = random.Random(SEED)
    plan = [(kind, rng.randint(1, TRAINING_EVENTS[kind]))
            for kind in rng.choices(sorted(TRAINING_EVENTS), k=TRAINING_KILLS)]
    plan += [("upload", rng.randint(1, 2)) for _ in range(UPLOAD_KILLS)]
    killed = 0
    for kind, nth in plan:
        ended = life(age_contrast_store, tmp_path, "killed", extra, kind, nth)
        if ended.returncode == -signal.SIGKILL:
            killed += 1
            continue
        assert ended.returncode == 0, ended.stderr[-3000:]
        break                     # this life outran its kill point: the run is complete
    assert killed >= 10, f"only {killed} of the {len(plan)} planned kills landed: {plan}"
    final = life(age_contrast_store, tmp_path, "killed", extra, "none", 0)
    assert final.returncode == 0, final.stderr[-3000:]
    assert json.loads(final.stdout.strip().splitlines()[-1])["global_step"] == \
        straight["global_step"]

    expected = checkpoint.load(checkpoint.latest_checkpoint(straight_dir))["engine"]["method"]
    got = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "killed"))["engine"]["method"]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key          # bit for bit
    # no half-written file looks complete: every checkpoint left verifies; and none is left
    for path in sorted((tmp_path / "killed" / "checkpoints").glob("*.pt")):
        checkpoint.load(path)
    assert [p.name for p in (tmp_path / "killed").rglob(".*.tmp-*")] == []

    client = MlflowClient(uri)
    run_id = (tmp_path / "killed" / "mlflow_run_id").read_text().strip()
    losses = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in losses]
    assert sorted(steps) == list(range(1, straight["global_step"] + 1))   # each step once
    reference = {m.step: m.value for m in client.get_metric_history(straight_run_id,
                                                                    "train/loss")}
    assert {m.step: m.value for m in losses} == reference
    versions = client.search_model_versions("name='killed-encoder'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias("killed-encoder", "current").version == \
        versions[0].version
