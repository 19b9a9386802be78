"""launch/submit.py without a cluster: the sbatch script it would submit, the resources it asks
for, job arrays, and the errors users hit. Fast: no training, no Slurm daemons.

Where a test needs Slurm's client commands it puts fake `sbatch`/`srun`/`sinfo`/`sacct` shell
scripts first on PATH (and nothing else: the real Slurm client may be installed). The fake
`sinfo` prints a fixed partition list; the fake `sbatch` keeps a copy of the script it was given
and answers like Slurm. tests/launch/test_slurm_cluster.py runs the same paths on a real cluster.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

import pytest

from hpcbrain.config import PROJECT_ROOT
from hpcbrain.launcher import (
    LaunchError,
    _split_values,
    expand_jobs,
    parse_time_min,
    plan_launch,
    sbatch_script,
)

SUBMIT = PROJECT_ROOT / "launch" / "submit.py"


def load_submit_module():
    spec = importlib.util.spec_from_file_location("hpcbrain_submit_cli", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def submit_cli():
    return load_submit_module()


@pytest.fixture
def run(submit_cli, capsys, tmp_path, monkeypatch):
    """run(*argv) -> (exit code, stdout, stderr); run.root in tmp_path, no Slurm on PATH."""
    no_slurm = tmp_path / "empty-bin"
    no_slurm.mkdir()
    monkeypatch.setenv("PATH", str(no_slurm))
    monkeypatch.chdir(tmp_path)

    def _run(*argv: str):
        code = submit_cli.main([*argv, f"run.root={tmp_path / 'runs'}"])
        out = capsys.readouterr()
        return code, out.out, out.err
    return _run


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake Slurm client commands, alone on PATH. Returns the folder where sbatch keeps scripts."""
    bin_dir = tmp_path / "fake-slurm-bin"
    bin_dir.mkdir()
    received = tmp_path / "sbatch-received"
    received.mkdir()
    scripts = {
        "sbatch": f"""#!/bin/sh
n=$(/bin/ls {received} | /usr/bin/wc -l)
/bin/cp "$1" {received}/script-$n.sh
echo "Submitted batch job 4242"
""",
        "srun": "#!/bin/sh\nexit 0\n",
        "sacct": "#!/bin/sh\nexit 0\n",
        "sinfo": "#!/bin/sh\necho 'debug*'\necho 'gpu'\necho 'gpu'\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return received


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


# --- the script and the resources ------------------------------------------------------------
def test_dry_run_two_gpu_nodes_one_task_per_gpu(run):
    code, out, err = run("--cfg", "lsor.yaml", "--nodes", "2", "--gpus-per-node", "4",
                         "--partition", "gpu", "--time", "2:00:00", "--account", "lab",
                         "--dry-run", "data.store=/nowhere/cohort.zarr")
    assert code == 0, err
    lines = sbatch_lines(out)
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=120",
                     "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
                     "#SBATCH --open-mode=append"):
        assert expected in lines, (expected, lines)
    assert "world size 8" in out
    assert "up to 3 (slurm.max_requeues)" in out
    assert "-m submitit.core._submit" in out
    # The resolved config follows the script, with the flags merged into `slurm`.
    config = out.split("---- resolved config")[1]
    assert "gpus_per_node: 4" in config and "nodes: 2" in config
    assert "store: /nowhere/cohort.zarr" in config       # no data needed for a dry run


def test_dry_run_cli_needs_neither_slurm_nor_data(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}   # no sbatch, no srun, no sinfo
    proc = subprocess.run([sys.executable, str(SUBMIT), "--cfg", "lsor.yaml", "--nodes", "2",
                           "--gpus-per-node", "4", "--dry-run", "data.store=missing.zarr",
                           f"run.root={tmp_path}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --ntasks-per-node=4" in proc.stdout


def test_cpu_partition_uses_tasks_per_node(run):
    code, out, err = run("--cfg", "lsor.yaml", "--nodes", "2", "--gpus-per-node", "0",
                         "--dry-run", "slurm.tasks_per_node=3", "slurm.cpus_per_task=2",
                         "slurm.mem_gb=7.5", "train.batch_size=12")
    assert code == 0, err
    lines = sbatch_lines(out)
    assert "#SBATCH --ntasks-per-node=3" in lines
    assert "#SBATCH --cpus-per-task=2" in lines
    assert "#SBATCH --mem=7680M" in lines
    assert not [line for line in lines if "gres" in line or "gpus" in line]
    assert "world size 6" in out


def test_cpu_partition_defaults_to_one_task_per_node(run):
    code, out, _ = run("--cfg", "lsor.yaml", "--nodes", "2", "--dry-run")
    assert code == 0
    assert "#SBATCH --ntasks-per-node=1" in sbatch_lines(out)


def test_profiles_load_and_extra_sbatch_options_pass_through(run):
    code, out, err = run("--cfg", "lsor.yaml", "--cfg", "slurm/profiles/gpu-cluster.yaml",
                         "--dry-run", "slurm.additional_parameters.mail-type=END",
                         "slurm.setup=[module load cuda]")
    assert code == 0, err
    lines = sbatch_lines(out)
    assert {"#SBATCH --gres=gpu:4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=240G", "#SBATCH --mail-type=END"} <= set(lines)
    assert "\nmodule load cuda\n" in out
    # A bare profile name finds slurm/profiles/ (the test runs outside the checkout).
    code, out, err = run("--cfg", "lsor.yaml", "--cfg", "smoke.yaml", "--cfg",
                         "devcluster.yaml", "--nodes", "2", "--dry-run")
    assert code == 0, err
    assert {"#SBATCH --partition=debug", "#SBATCH --ntasks-per-node=1",
            "#SBATCH --signal=USR2@30"} <= set(sbatch_lines(out))


def test_engine_flag_sets_the_engine(run):
    code, out, err = run("--cfg", "lsor.yaml", "--engine", "deepspeed", "--dry-run")
    assert code == 0, err
    assert "name: deepspeed" in out.split("---- resolved config")[1]


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("0:00:30", 1),
                                            ("45:00", 45), ("45:30", 46), ("2-00:00:00", 2880),
                                            ("1-12", 2160), ("1-12:30", 2190)])
def test_time_formats(text, minutes):
    assert parse_time_min(text) == minutes


def test_bad_time_is_explained():
    with pytest.raises(LaunchError, match="H:MM:SS"):
        parse_time_min("two hours")


def test_relative_paths_are_pinned_at_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_launch(["lsor.yaml"], ["run.root=runs", "data.store=data/c.zarr"])
    assert plan.configs[0].run.root == str(tmp_path / "runs")
    assert plan.configs[0].data.store == str(tmp_path / "data" / "c.zarr")
    assert plan.log_dir == tmp_path / "runs" / "slurm-logs" / "%j"


# --- errors users hit ------------------------------------------------------------------------
def test_no_slurm_suggests_local(run):
    code, _, err = run("--cfg", "lsor.yaml", "--nodes", "2")
    assert code == 2
    assert "no Slurm on this machine" in err and "--local" in err and "sbatch" in err


def test_gpus_and_tasks_mismatch(run):
    code, _, err = run("--cfg", "lsor.yaml", "--gpus-per-node", "4", "--dry-run",
                       "slurm.tasks_per_node=2")
    assert code == 2
    assert "slurm.tasks_per_node=2 does not match slurm.gpus_per_node=4" in err
    assert "one task per GPU" in err


def test_global_batch_must_split_over_the_tasks(run):
    code, _, err = run("--cfg", "lsor.yaml", "--nodes", "3", "--dry-run")
    assert code == 2
    assert "'train.batch_size': 64" in err and "3 ranks" in err and "train.batch_size=63" in err


def test_unknown_partition_lists_the_partitions(run, fake_slurm):
    # Fake sinfo (see the module docstring); the real one is checked in test_slurm_cluster.py.
    code, _, err = run("--cfg", "lsor.yaml", "--partition", "gpus")
    assert code == 2
    assert "unknown partition 'gpus'" in err and "debug, gpu" in err
    assert not list(fake_slurm.iterdir()), "nothing may be submitted"


def test_unknown_config_key_is_reported(run):
    code, _, err = run("--cfg", "lsor.yaml", "--dry-run", "slurm.gpus=4")
    assert code == 2
    assert "unknown key 'slurm.gpus'" in err and "gpus_per_node" in err


# --- submission (fake sbatch) ----------------------------------------------------------------
def test_submission_sends_exactly_the_dry_run_script(run, fake_slurm):
    argv = ("--cfg", "lsor.yaml", "--nodes", "2", "--gpus-per-node", "2", "--partition", "gpu")
    code, dry, err = run(*argv, "--dry-run")
    assert code == 0, err
    code, out, err = run(*argv)
    assert code == 0, err
    assert "submitted job 4242: 2 node(s) x 2 task(s) on gpu" in out
    assert "4242_0_log.out" in out and "4242_0_log.err" in out
    assert "MLflow:" in out and "experiment hpcbrain" in out
    (sent,) = fake_slurm.iterdir()
    script = dry.split("---- sbatch script")[1].split("\n", 1)[1].split("\n# ---- ")[0]
    assert sent.read_text().strip() == script.strip()


def test_sbatch_refusal_is_shown_plainly(run, fake_slurm):
    (fake_slurm.parent / "fake-slurm-bin" / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
        "exit 1\n")
    code, _, err = run("--cfg", "lsor.yaml", "--account", "nobody")
    assert code == 2
    assert "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid " \
           "account" in err


def test_folds_go_out_as_one_job_array(run, fake_slurm):
    code, out, err = run("--cfg", "lsor.yaml", "--folds", "5", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --array=0-4%5" in sbatch_lines(out)
    assert "job array: 5 elements" in out and "[4] lsor-fold4" in out
    code, out, err = run("--cfg", "lsor.yaml", "--folds", "5")
    assert code == 0, err
    assert len(list(fake_slurm.iterdir())) == 1, "one sbatch call for the whole array"
    assert "submitted job array 4242 (5 elements)" in out
    assert all(f"job 4242_{k}  run lsor-fold{k}" in out for k in range(5))


def test_folds_and_sweeps_expand_to_their_product():
    configs, names, job_name = expand_jobs(
        ["lsor.yaml"], ["train.epochs=3", "lsor.warmup_epochs=1"], folds=2,
        sweeps=[("train.lr", ["1e-3", "5e-4"]), ("model.widths", ["[4,8]", "[8,16]"])])
    assert job_name == "lsor" and len(configs) == 8 and len(set(names)) == 8
    assert [c.data.fold for c in configs[:2]] == [0, 1]
    assert {c.data.n_folds for c in configs} == {2}
    assert {(c.train.lr, tuple(c.model.widths)) for c in configs} == {
        (1e-3, (4, 8)), (1e-3, (8, 16)), (5e-4, (4, 8)), (5e-4, (8, 16))}
    assert all(c.train.epochs == 3 for c in configs)
    assert names[0] == "lsor-lr1e-3-widths48-fold0"
    assert [c.run.name for c in configs] == names


def test_sweep_values_keep_lists_whole():
    assert _split_values("[4,8],[8,16]") == ["[4,8]", "[8,16]"]
    assert _split_values("1e-3, 5e-4") == ["1e-3", "5e-4"]


def test_sweeping_resources_is_refused(run):
    code, _, err = run("--cfg", "lsor.yaml", "--sweep", "slurm.nodes=1,2", "--dry-run")
    assert code == 2 and "same resources" in err


# --- the callable Slurm runs -----------------------------------------------------------------
def test_checkpoint_only_resubmits_itself():
    plan = plan_launch(["lsor.yaml"], [])
    from hpcbrain.job import TrainingJob

    job = TrainingJob(plan.configs[0])
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    again = pickle.loads(pickle.dumps(job))     # what submitit writes for the requeued job
    assert again.cfg == job.cfg


def test_sbatch_script_of_an_array_names_every_element_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_launch(["lsor.yaml"], [], folds=3)
    text = sbatch_script(plan)
    assert "%A_%a_0_log.out" in text and "#SBATCH --array=0-2%3" in text
    assert os.fspath(tmp_path / "runs" / "slurm-logs") in text


@pytest.mark.parametrize("bad, message", [
    ("data.store={tmp}/missing.zarr", "does not exist"),
    ("train.epochs=-1", "'train.epochs'"),
    ("run.name=${{oops}}", "OmegaConf interpolation"),
])
def test_hpcbrain_train_and_submit_local_share_one_entry_and_one_error_list(
        run, tmp_path, capsys, bad, message):
    """The same user error, the same line and exit status 2 from both ways of training here."""
    from hpcbrain.cli import main as hpcbrain

    argument = bad.format(tmp=tmp_path)
    code, _, local_err = run("--cfg", "lsor.yaml", "--cfg", "smoke.yaml", "--local", argument)
    assert code == 2 and message in local_err, local_err
    assert hpcbrain(["train", "--cfg", "lsor.yaml", "--cfg", "smoke.yaml", argument,
                     f"run.root={tmp_path / 'runs'}"]) == 2
    train_err = capsys.readouterr().err
    assert train_err.strip().splitlines()[-1] == local_err.strip().splitlines()[-1]
    assert "Traceback" not in train_err + local_err
