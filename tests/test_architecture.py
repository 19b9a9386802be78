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
