"""Writers racing on shared things: one model name registered by several runs at the same
moment (on a fresh local sqlite store and on a tracking server), and BIDS-App array tasks
claiming one derivatives folder. Real processes, real stores, barriers made of files so that
the racers really meet."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port

RACER = r"""
import json, sys, time
from pathlib import Path
import torch
from omegaconf import OmegaConf
from hpcbrain.config import TrackingConfig
from hpcbrain.tracking import MlflowTracker

uri, name, folder, me, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def wait_for(path):
    while not path.exists():
        time.sleep(0.02)

(folder / f"up{me}").touch(); wait_for(folder / "start")       # open the store together
cfg = OmegaConf.structured(TrackingConfig(uri=uri, registered_model=name, experiment="race"))
tracker = MlflowTracker(cfg, {"racer": me}, folder / f"run{me}")
real_register, real_publish = tracker._register, tracker._publish

def register(*args, **kwargs):                                   # register together
    (folder / f"ready{me}").touch(); wait_for(folder / "go")
    return real_register(*args, **kwargs)

def publish(item, upload):                                       # racer 0 moves the alias last
    if me == 0 and item.startswith("alias"):
        wait_for(folder / "others-done")
    return real_publish(item, upload)

tracker._register, tracker._publish = register, publish
model = tracker.log_encoder(torch.nn.Linear(4, 2), torch.randn(2, 4))
tracker.finish()
print(json.dumps({"model": model, "run_id": tracker.run_id}))
"""


def release_when_all(folder: Path, prefix: str, n: int, gate: str, procs, timeout_s=180.0):
    deadline = time.monotonic() + timeout_s
    while not all((folder / f"{prefix}{k}").exists() for k in range(n)):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        assert not failed, failed[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"racers never all reached {prefix}"
        time.sleep(0.05)
    (folder / gate).touch()


@pytest.mark.slow
@pytest.mark.minutes
@pytest.mark.parametrize("backend", ["fresh sqlite store", "tracking server"])
def test_three_registrations_of_one_name_at_the_same_moment_all_land(backend, tmp_path):
    """Three runs open the store together (on a fresh sqlite file MLflow's schema migrations
    raced before: "table _alembic_tmp_params already exists"), register `race-enc` at the same
    moment: three versions, one per run, and the alias on the run that moved it last."""
    from mlflow import MlflowClient

    server = None
    if backend == "tracking server":
        (tmp_path / "server").mkdir()
        server = MlflowServer(tmp_path / "server", free_port())
        server.start()
        uri = server.uri
    else:
        uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    n = 3
    procs: list[subprocess.Popen] = []
    try:
        procs += [subprocess.Popen([sys.executable, "-c", RACER, uri, "race-enc", str(tmp_path),
                                   str(k), str(n)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k in range(n)]
        release_when_all(tmp_path, "up", n, "start", procs)
        release_when_all(tmp_path, "ready", n, "go", procs)
        results = {}
        for k in [*range(1, n), 0]:           # racer 0 moves its alias once the others ended
            if k == 0:
                (tmp_path / "others-done").touch()
            out, err = procs[k].communicate(timeout=240)
            assert procs[k].returncode == 0, err[-3000:]
            results[k] = json.loads(out.strip().splitlines()[-1])
        results = [results[k] for k in range(n)]
        assert [r["model"] for r in results] == ["models:/race-enc@current"] * n
        client = MlflowClient(uri)
        versions = client.search_model_versions("name='race-enc'")
        assert sorted(v.run_id for v in versions) == sorted(r["run_id"] for r in results)
        assert sorted(int(v.version) for v in versions) == [1, 2, 3]
        assert client.get_model_version_by_alias("race-enc", "current").run_id == \
            results[0]["run_id"]
    finally:
        for proc in procs:                # a racer left waiting at a barrier by a failure
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if server is not None:
            server.stop()


def test_tasks_claiming_one_derivatives_folder_leave_one_whole_description(tmp_path):
    """Eight tasks of one model and four of another claim a fresh folder at the same moment:
    one whole dataset_description.json, no drafts left; the other model's tasks are refused
    if the first model claimed it, and the same model's if the other did."""
    from hpcbrain.bids_app import BidsAppError, _claim_output

    def description(model):
        return {"Name": "hpcbrain", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "hpcbrain", "Description": f"model {model}"}]}

    out = tmp_path / "derivatives"
    start = threading.Barrier(12)
    outcomes: dict[int, str] = {}

    def task(k):
        model = "models:/a@current" if k < 8 else "models:/b@current"
        start.wait()
        try:
            _claim_output(out, description(model))
            outcomes[k] = model
        except BidsAppError:
            outcomes[k] = "refused"

    threads = [threading.Thread(target=task, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = json.loads((out / "dataset_description.json").read_text())
    winner = written["GeneratedBy"][0]["Description"].removeprefix("model ")
    assert {m for m in outcomes.values() if m != "refused"} == {winner}
    assert sum(m == "refused" for m in outcomes.values()) == (4 if winner.startswith(
        "models:/a") else 8)
    assert [p.name for p in out.iterdir()] == ["dataset_description.json"]
