"""The linter configured in pyproject.toml ([tool.ruff]) passes on the whole tree."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = (shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent))
           or shutil.which("ruff"))
    if exe is None:
        pytest.fail("ruff is not installed: it is part of the dev extra (pip install -e '.[dev]')")
    return [exe]


def test_ruff_passes():
    proc = subprocess.run(_ruff() + ["check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
