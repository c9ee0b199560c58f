"""The floors of docs/architecture.md as a contract (import-linter, configured in pyproject.toml):
every import points down, and the three rooms of the middle floor do not import each other."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernel", "battles", "flywheel", "features", "ensemble", "models", "pipeline")


def _lint(where: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(where / "pyproject.toml"), "--no-cache"], cwd=where,
                          capture_output=True, text=True, timeout=300)


def test_every_import_points_down():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_the_contract_catches_an_import_that_climbs(tmp_path):
    """A copy of the tree where the kernel imports the pipeline breaks the contract."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    files = tmp_path / "kernel" / "files.py"
    files.write_text(files.read_text() + "\nfrom pipeline import rundir  # noqa: E402,F401\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "kernel.files -> pipeline.rundir" in done.stdout, done.stdout
