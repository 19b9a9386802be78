"""The architecture is checked, not only described: the import rules of docs/architecture.md
are import-linter contracts (pyproject.toml) that pass on the tree and break on a forbidden
import, and the document names every module of the package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_the_import_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    shutil.copytree(ROOT / "hpcbrain", tmp_path / "hpcbrain",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    store = tmp_path / "hpcbrain" / "data" / "store.py"
    store.write_text(store.read_text() + "\nfrom hpcbrain.methods import base  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "data stands apart" in result.stdout and "BROKEN" in result.stdout
    assert "hpcbrain.data.store -> hpcbrain.methods.base" in result.stdout


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "hpcbrain"
    modules = sorted(str(p.relative_to(package).with_suffix("")).replace(os.sep, "/")
                     for p in package.rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if f"`{m}.py`" not in page]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_components_are_built_from_their_sections_alone(tmp_path):
    """Method, engine and tracker take their own config sections (and what the composition
    root settles), never the root config: the same objects as the job's builders make."""
    import torch
    from conftest import tiny_config

    from hpcbrain.config import MethodSections
    from hpcbrain.engine.backends import build_engine
    from hpcbrain.methods import build_method
    from hpcbrain.methods.lsor import LSOR
    from hpcbrain.tracking import NullTracker, make_tracker

    cfg = tiny_config("lsor.yaml", **{"data.input_size": 16, "model.widths": [2, 2, 2, 2],
                                      "lsor.grid_rows": 2, "lsor.grid_cols": 3})
    torch.manual_seed(0)
    alone = LSOR(MethodSections(own=cfg.lsor, model=cfg.model, input_size=16,
                                epochs=int(cfg.train.epochs), seed=int(cfg.train.seed)))
    torch.manual_seed(0)
    built = build_method(cfg)
    assert alone.grid == built.grid == (2, 3)
    for (name, a), (_, b) in zip(alone.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name
    engine = build_engine(cfg.engine, cfg.train, alone, torch.device("cpu"))
    assert engine.name == "single" and engine.lr == cfg.train.lr
    tracking = cfg.tracking.copy()
    tracking.enabled = False
    assert type(make_tracker(tracking, {}, tmp_path, True)) is NullTracker
