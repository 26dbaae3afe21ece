"""The four packages stay ruff-clean and mypy --strict clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.timeout(300)
def test_ruff() -> None:
    # The four packages and the tests; benchmarks are scripts run by hand.
    paths = ["lmx_protocol", "lmx_worker", "lmx_supervisor", "lmx_gateway", "tests"]
    result = subprocess.run([str(BIN / "ruff"), "check", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
