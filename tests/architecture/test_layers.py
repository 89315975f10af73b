"""The layering contracts (pyproject.toml, [tool.importlinter]) and ruff hold, and they do catch a bad import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the ``d2m_dist`` found under ``package_parent``, with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(BIN / "lint-imports"), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=300)


def ruff(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ruff"), "check", "--config", str(REPO / "pyproject.toml"), *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


def test_the_repository_keeps_its_contracts_and_ruff_passes():
    p = lint_imports(REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "0 broken" in p.stdout
    p = ruff(REPO / "d2m_dist", REPO / "tests")
    assert p.returncode == 0, p.stdout[-3000:]


def test_an_upward_import_breaks_the_layers(tmp_path):
    copy = tmp_path / "d2m_dist"
    shutil.copytree(REPO / "d2m_dist", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert lint_imports(tmp_path).returncode == 0  # the copy is checked, and clean
    spec = copy / "models" / "spec.py"  # models below distill: importing the trainer is upwards
    bad = "from d2m_dist.distill import trainer  # noqa: F401\n"
    spec.write_text(spec.read_text().replace("from d2m_dist.config import", bad + "from d2m_dist.config import", 1))
    p = lint_imports(tmp_path)
    assert p.returncode != 0 and "1 broken" in p.stdout, p.stdout[-3000:]
    assert "d2m_dist.models.spec -> d2m_dist.distill.trainer" in p.stdout


def test_the_framework_may_not_import_the_digits_preset(tmp_path):
    copy = tmp_path / "d2m_dist"
    shutil.copytree(REPO / "d2m_dist", copy, ignore=shutil.ignore_patterns("__pycache__"))
    losses = copy / "distill" / "losses.py"
    losses.write_text(losses.read_text().replace("import torch\n", "import torch\n\nimport d2m_dist.digits.card  # noqa: F401\n", 1))
    p = lint_imports(tmp_path)
    assert p.returncode != 0 and "The framework never imports the embedded digits preset" in p.stdout
    assert "BROKEN" in p.stdout


def test_ruff_catches_an_unused_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n")
    p = ruff(f)
    assert p.returncode != 0 and "F401" in p.stdout
