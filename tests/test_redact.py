"""No credentials in what hpcbrain writes or shows: MLflow params, the run's config.yaml,
checkpoints, result.json, `hpcbrain config`, the dry-run's sbatch script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hpcbrain.config import flatten_config, load_config, save_config
from hpcbrain.redact import redact_text

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-pa55"
OVERRIDES = [f"tracking.uri=https://alice:{SECRET}@mlflow.example.org/",
             f"slurm.setup=['export MLFLOW_TRACKING_PASSWORD={SECRET}', 'module load cuda']"]


def test_redact_text_masks_url_passwords_and_secret_assignments():
    assert redact_text("https://alice:pw@host:5000/x") == "https://alice:***@host:5000/x"
    assert redact_text("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert redact_text("export AWS_SECRET_ACCESS_KEY='a b'; x=1") == \
        "export AWS_SECRET_ACCESS_KEY=***; x=1"
    assert redact_text("API_TOKEN=abc module load x") == "API_TOKEN=*** module load x"
    assert redact_text("sqlite:////tmp/mlflow.db and module load cuda") == \
        "sqlite:////tmp/mlflow.db and module load cuda"          # nothing secret: unchanged


def test_params_and_config_files_carry_no_credentials(tmp_path):
    cfg = load_config(["lsor.yaml"], OVERRIDES)
    assert SECRET in cfg.tracking.uri                            # the job keeps the real value
    flat = flatten_config(cfg)
    assert SECRET not in str(flat) and flat["tracking.uri"] == "https://alice:***@mlflow.example.org/"
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert SECRET not in text and "module load cuda" in text


def test_console_output_carries_no_credentials():
    shown = subprocess.run([sys.executable, "-m", "hpcbrain.cli", "config", "--cfg", "lsor.yaml",
                            *OVERRIDES], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and SECRET not in shown.stdout
    dry = subprocess.run([sys.executable, "launch/submit.py", "--cfg", "lsor.yaml", "--dry-run",
                          *OVERRIDES], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    assert SECRET not in dry.stdout and "MLFLOW_TRACKING_PASSWORD=***" in dry.stdout
