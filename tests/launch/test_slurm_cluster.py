"""launch/submit.py on a real Slurm cluster: the single-host dev cluster (slurm/devcluster/).

The session fixture starts the cluster (munge, mariadb, slurmdbd, slurmctld, two slurmd nodes)
and stops it at the end, also when a test fails (set HPCBRAIN_DEVCLUSTER_KEEP=1 to leave it
running for debugging). Where the machine cannot start it (not root, no apt-get for missing
packages) the tests skip with that reason; under CI (CI=true) they fail instead.

A: `--nodes 2 --wait` trains LSOR with DDP over gloo, one task on each node, and registers the
   encoder.
B: a running 2-node job without periodic checkpoints is preempted mid-epoch (submitit's
   job._interrupt(): SIGTERM, then USR2): both ranks stop after the same step with a checkpoint
   of it, the job requeues, resumes at the next step and finishes with every step 1..N logged
   exactly once, in the same MLflow run.
Plus: --wait on a failing job exits 1 with the error and log paths; the plain sbatch template
(slurm/sbatch_template.sh) trains on both nodes; an unknown partition is named by the real sinfo.
Wall times: docs/slurm.md.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcbrain.config import PROJECT_ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DEVCLUSTER = PROJECT_ROOT / "slurm" / "devcluster"
SUBMIT = PROJECT_ROOT / "launch" / "submit.py"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd")
REGISTERED_MODEL = "hpcbrain-lsor-encoder"


def _cannot_start_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the dev cluster runs on Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "the dev cluster needs root (its daemons run as root; /etc/hosts gets node1/node2)"
    installed = all(shutil.which(cmd) or Path("/usr/sbin", cmd).exists() for cmd in DAEMONS)
    if not installed and shutil.which("apt-get") is None:
        return "Slurm/munge/mariadb are not installed and there is no apt-get to install them"
    return None


@pytest.fixture(scope="session")
def devcluster(request):
    """Start the dev cluster once per session; SLURM_CONF set for this process and children."""
    reason = _cannot_start_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: the real-cluster tests must run, but {reason}")
        pytest.skip(reason)
    if os.environ.get("HPCBRAIN_DEVCLUSTER_KEEP") != "1":
        # Registered before starting: a half-started cluster is stopped as well.
        request.addfinalizer(lambda: subprocess.run([str(DEVCLUSTER / "stop.sh")], timeout=300))
    started = time.monotonic()
    proc = subprocess.run([str(DEVCLUSTER / "start.sh")], capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"slurm/devcluster/start.sh failed ({proc.returncode}):\n{proc.stderr}")
    match = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert match, proc.stdout
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", match.group(1))
    request.addfinalizer(patch.undo)
    print(f"dev cluster up in {time.monotonic() - started:.1f} s ({match.group(1)})")
    return match.group(1)


@pytest.fixture(scope="session")
def cluster_store(tmp_path_factory):
    """16 subjects × 3 visits of 32³ (smoke.yaml's input size): ~9 steps per epoch at batch 4."""
    from conftest import build_cohort_store

    return build_cohort_store(tmp_path_factory.mktemp("cluster-data"), subjects=16, visits=3,
                              size=32, scans_per_shard=8)


def submit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=timeout)


def common_overrides(store: Path, tmp: Path) -> list[str]:
    return [f"data.store={store}", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"run.root={tmp}"]


def sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def settled_sacct_states(job_id: str, timeout_s: float = 60.0) -> list[str]:
    """sacct's states once the last one is final: the accounting record lags the job's own
    result files by a few seconds, so a job whose results are in may still read RUNNING."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = sacct_states(job_id)
        if (states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED")) \
                or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def sacct_nodes(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NodeList"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


def logged_steps(db: Path, key: str) -> int:
    """How many values of metric `key` the sqlite tracking store holds (0 before it exists)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT COUNT(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.OperationalError:        # tables not created yet, or locked for a moment
        return 0


def mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


@pytest.mark.timeout(900)
def test_two_node_ddp_training_completes_and_registers(devcluster, cluster_store, tmp_path):
    started = time.monotonic()
    proc = submit("--cfg", "lsor.yaml", "--cfg", "smoke.yaml", "--nodes", "2", "--engine", "ddp",
                  "--wait", *common_overrides(cluster_store, tmp_path))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    finished = re.search(rf"job {job_id} finished: (\d+) steps, (\d+) epochs", proc.stdout)
    assert finished, proc.stdout
    assert int(finished.group(2)) == 3 and int(finished.group(1)) == 3 * 4   # smoke.yaml
    print(f"2-node job {job_id}: {elapsed:.1f} s submit→finished")

    # One task on each node, both ranks in one gloo group, both finished.
    assert sacct_nodes(job_id) == "node[1-2]"
    logs = tmp_path / "slurm-logs" / job_id
    assert (logs / f"{job_id}_0_result.pkl").exists() and (logs / f"{job_id}_1_result.pkl").exists()
    rank0_log = (logs / f"{job_id}_0_log.err").read_text()
    assert "[rank 0/2]" in rank0_log, rank0_log[-3000:]
    config = (tmp_path / "smoke" / "config.yaml").read_text()
    assert "name: ddp" in config

    # The encoder is in the registry, from this job's MLflow run.
    run_id = (tmp_path / "smoke" / "mlflow_run_id").read_text().strip()
    assert f"MLflow run:        {run_id}" in proc.stdout
    client = mlflow_client(tmp_path)
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "current")
    assert version.run_id == run_id
    assert f"models:/{REGISTERED_MODEL}@current" in proc.stdout
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.timeout(900)
def test_preempted_job_requeues_and_resumes_in_the_same_mlflow_run(devcluster, cluster_store,
                                                                   tmp_path):
    """No periodic checkpoints: the stop itself saves the step it ends on, so after the requeue
    no step is trained or logged twice."""
    import submitit

    epochs = 8
    proc = submit("--cfg", "lsor.yaml", "--cfg", "smoke.yaml", "--nodes", "2",
                  *common_overrides(cluster_store, tmp_path), f"train.epochs={epochs}",
                  "train.max_steps_per_epoch=null", "train.checkpoint_every_steps=null",
                  "run.name=preempted")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    run_dir = tmp_path / "preempted"
    run_file = run_dir / "mlflow_run_id"

    # Preempt once training steps are being logged (mid-epoch: no checkpoint on disk yet),
    # read straight from the sqlite store: an MlflowClient per poll is too slow for a job that
    # trains for ~30 s.
    deadline = time.monotonic() + 300
    while not logged_steps(tmp_path / "mlflow.db", "train/loss") >= 2:
        assert time.monotonic() < deadline, "no training step logged within 5 min"
        assert "COMPLETED" not in sacct_states(job_id)
        time.sleep(0.1)
    run_id_before = run_file.read_text().strip()
    client = mlflow_client(tmp_path)
    job = submitit.SlurmJob(folder=tmp_path / "slurm-logs" / "%j", job_id=job_id, tasks=[0, 1])
    interrupted = time.monotonic()
    job._interrupt()                       # preemption: SIGTERM, then USR2
    results = job.results()                # waits through the requeue
    elapsed = time.monotonic() - interrupted

    states = settled_sacct_states(job_id)
    assert "REQUEUED" in states, f"job {job_id} was not requeued: {states}"
    assert states[-1] == "COMPLETED", states
    rank0_log = (tmp_path / "slurm-logs" / job_id / f"{job_id}_0_log.err").read_text()
    assert "Requeued job" in rank0_log and "resumed from" in rank0_log, rank0_log[-3000:]
    stopped_at = int(re.search(r"stopped by SIG\w+ after global step (\d+)", rank0_log).group(1))
    steps_per_epoch = int(re.search(r"(\d+) steps per epoch", rank0_log).group(1))
    final_step = epochs * steps_per_epoch
    assert results[0].global_step == final_step and results[0].epochs == epochs
    print(f"preempted job {job_id} after step {stopped_at} of {final_step}: {elapsed:.1f} s from "
          f"the signal to finished")

    # Same MLflow run before and after; every step logged exactly once, none beyond the end.
    assert results[0].run_id == run_id_before
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id_before
    experiment = client.get_experiment_by_name("hpcbrain")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id_before]
    steps = [m.step for m in client.get_metric_history(run_id_before, "train/loss")]
    assert sorted(steps) == list(range(1, final_step + 1))
    assert max(m.step for m in client.get_metric_history(run_id_before, "epoch/train_loss")) \
        == final_step
    assert client.get_run(run_id_before).info.status == "FINISHED"


def test_unknown_partition_on_the_real_cluster(devcluster):
    proc = submit("--cfg", "lsor.yaml", "--partition", "nope", timeout=120)
    assert proc.returncode == 2
    assert "unknown partition 'nope'" in proc.stderr and "debug" in proc.stderr


@pytest.mark.timeout(600)
def test_wait_exits_non_zero_and_points_at_the_logs_when_the_job_fails(devcluster, tmp_path):
    proc = submit("--cfg", "lsor.yaml", "--cfg", "smoke.yaml", "--nodes", "2", "--wait",
                  *common_overrides(tmp_path / "no-such-store.zarr", tmp_path))
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    assert f"job {job_id} FAILED" in proc.stderr
    assert "no-such-store.zarr" in proc.stderr                  # the job's own error
    assert f"{job_id}_0_log.err" in proc.stderr                  # where to look


@pytest.mark.timeout(600)
def test_plain_sbatch_template_trains_on_two_nodes(devcluster, cluster_store, tmp_path):
    # The template asks for GPUs; the dev cluster has none: sbatch flags override its #SBATCH.
    out = tmp_path / "template-%j.out"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gres=none",
         "--cpus-per-task=1", "--time=10", f"--output={out}",
         f"--export=ALL,HPCBRAIN_DIR={PROJECT_ROOT},PYTHON={sys.executable}",
         str(PROJECT_ROOT / "slurm" / "sbatch_template.sh"), "--cfg", "lsor.yaml", "--cfg",
         "smoke.yaml", *common_overrides(cluster_store, tmp_path), "run.name=template"],
        capture_output=True, text=True, cwd=tmp_path, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 500
    while (states := sacct_states(job_id)) == [] or states[-1] in ("PENDING", "RUNNING",
                                                                     "REQUEUED", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job_id} still {states}"
        time.sleep(2)
    log = Path(str(out).replace("%j", job_id)).read_text()
    assert states[-1] == "COMPLETED", log[-3000:]
    assert "2 nodes, 2 tasks, master node1" in log
    assert "[rank 0/2]" in log and "Created version" in log
    assert sacct_nodes(job_id) == "node[1-2]"


@pytest.mark.timeout(900)
def test_bids_app_runs_one_participant_per_array_task(devcluster, tmp_path):
    """--bids-app on the real cluster: a model trained here, one array task per chosen
    participant, each writing its derivatives into the shared folder; --wait then gathers the
    group tables."""
    from conftest import lsor_run_config
    from sources import make_bids

    from hpcbrain.data.convert import convert_cohort
    from hpcbrain.job import run_training

    bids = make_bids(tmp_path / "bids", n_subjects=4, n_sessions=2, shape=(18, 16, 14))
    store = convert_cohort(bids, tmp_path / "cohort.zarr", 16, progress=False).out
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_training(lsor_run_config(
        store, tmp_path / "runs", "app", "tracking.enabled=true", f"tracking.uri={uri}",
        "tracking.registered_model=cluster-app", "train.epochs=2", "data.val_fraction=0"))
    out = tmp_path / "derivatives"
    proc = submit("--bids-app", str(bids), str(out), "--model", result.model_uri,
                  "--participant-label", "01", "03", "--wait", f"tracking.uri={uri}",
                  f"run.root={tmp_path}")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    job_id = re.search(r"submitted job array (\d+) \(2 participants\)", proc.stdout).group(1)
    assert settled_sacct_states(job_id) == ["COMPLETED", "COMPLETED"]
    table = (out / "group" / "latents.tsv").read_text().splitlines()
    assert [row.split("\t")[:2] for row in table[1:]] == [
        ["sub-01", "ses-01"], ["sub-01", "ses-02"], ["sub-03", "ses-01"], ["sub-03", "ses-02"]]
    assert not (out / "sub-02").exists()


@pytest.mark.timeout(900)
def test_conversion_array_with_a_cancelled_task_rerun_equals_a_local_conversion(devcluster,
                                                                               tmp_path):
    """--convert on the real cluster: 3 array tasks over a source with a corrupt scan
    (--skip-bad), one task cancelled while the array runs → exit 1 naming it; the same command
    again → only the unfinished block is submitted, and the store equals a local conversion's
    (shard files byte for byte, columns, ledger), the corrupt scan named in the ledger."""
    import numpy as np
    from sources import make_bids
    from store_checks import assert_same_store

    from hpcbrain.data.convert import convert_cohort
    from hpcbrain.data.ledger import read_ledger

    bids = make_bids(tmp_path / "bids", n_subjects=12, n_sessions=2, shape=(40, 36, 32))
    corrupt = bids / "sub-05" / "ses-02" / "anat" / "sub-05_ses-02_T1w.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    local = convert_cohort(bids, tmp_path / "local.zarr", 16, scans_per_shard=4, skip_bad=True,
                           progress=False).out
    out = tmp_path / "array.zarr"
    command = [sys.executable, str(SUBMIT), "--convert", str(bids), str(out), "--shape", "16",
               "--tasks", "3", "--scans-per-shard", "4", "--skip-bad", "--wait",
               f"run.root={tmp_path}"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=PROJECT_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    array_id = None
    for line in first.stdout:
        found = re.search(r"submitted job array (\d+) \(3 of 3 blocks unfinished", line)
        if found:
            array_id = found.group(1)
            subprocess.run(["scancel", f"{array_id}_1"], check=True)   # killed mid-way
            break
    remaining, errors = first.communicate(timeout=600)
    assert array_id, f"{remaining}\n{errors}"
    assert first.returncode == 1, f"{remaining}\n{errors}"
    assert "rerun the same command to convert the 1 unfinished block(s)" in errors
    assert not out.exists() and out.with_name("array.zarr.partial").is_dir()

    again = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT,
                           timeout=600)
    assert again.returncode == 3, f"{again.stdout}\n{again.stderr}"    # converted, 1 left out
    assert re.search(r"submitted job array \d+ \(1 of 3 blocks unfinished", again.stdout)
    assert_same_store(out, local)
    failed = [r for r in read_ledger(out) if r["status"] != "ok"]
    assert [(Path(r["path"]).name, r["status"]) for r in failed] == \
        [("sub-05_ses-02_T1w.nii.gz", "failed")]
    assert "cannot read" in failed[0]["reason"] and np.isfinite(failed[0]["seconds"])
    assert (tmp_path / "array_qc" / "index.html").is_file()


@pytest.mark.timeout(900)
def test_conversion_array_appends_a_second_wave_leaving_the_shards_alone(devcluster, tmp_path):
    """--convert … --append on the real cluster: a first wave through the array, then the
    whole source with --append → the scans, images and columns of a local conversion of all
    of it, every shard file of the first wave byte for byte as it was; once more → nothing."""
    from sources import arriving_in_waves
    from store_checks import assert_same_scans, shard_hashes

    from hpcbrain.data.convert import convert_cohort

    show = arriving_in_waves(tmp_path, n_subjects=6, shape=(40, 36, 32))
    out = tmp_path / "array.zarr"

    def submit(source, *extra):
        return subprocess.run([sys.executable, str(SUBMIT), "--convert", str(source), str(out),
                               "--shape", "16", "--tasks", "2", "--scans-per-shard", "4",
                               "--wait", *extra, f"run.root={tmp_path}"],
                              capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)

    first = submit(show(1))
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
    before = shard_hashes(out)
    second = submit(show(3), "--append")
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr}"
    assert "appended 13 scans" in second.stdout
    after = shard_hashes(out)
    assert {k: after[k] for k in before} == before
    local = convert_cohort(show(3), tmp_path / "local.zarr", 16, scans_per_shard=4,
                           progress=False, qc_report=False).out
    assert_same_scans(out, local)
    third = submit(show(3), "--append")
    assert third.returncode == 0 and "nothing to append" in third.stdout, third.stderr
