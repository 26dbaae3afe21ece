"""`~/.opta-lmx/compatibility-registry.json`: a ledger of how each model
fared on each backend version. One row per load outcome
(pass or fail) and per worker crash; at most MAX_ROWS, oldest dropped.
Written atomically on every row, so the file is always whole."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import msgspec

from lmx_supervisor.atomic_json import (
    read_json_or_set_aside,
    remove_stale_temp_files,
    write_json_atomic,
)

log = logging.getLogger("lmx.compatibility")

FILE_NAME = "compatibility-registry.json"
MAX_ROWS = 2000
Outcome = Literal["pass", "fail"]

# The Python distribution that carries each backend, for its version when no
# worker got far enough to report one.
_BACKEND_DISTRIBUTIONS = {"llama_cpp": "llama_cpp_python", "mlx": "mlx-lm"}


class CompatRow(msgspec.Struct, kw_only=True):
    ts: float
    model_id: str
    backend: str
    backend_version: str
    outcome: Outcome
    # "load" (a worker start, first or after a crash) or "crash".
    event: str
    reason: str = ""
    path: str = ""


class RegistryFile(msgspec.Struct, kw_only=True):
    version: int = 1
    rows: list[CompatRow] = []


def installed_backend_version(backend: str) -> str:
    dist = _BACKEND_DISTRIBUTIONS.get(backend)
    if dist is None:
        return ""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _convert(data: Any) -> RegistryFile:
    return msgspec.convert(data, RegistryFile)


class CompatibilityRegistry:
    def __init__(self, path: Path, max_rows: int = MAX_ROWS) -> None:
        self.path = path
        self.max_rows = max_rows
        remove_stale_temp_files(path)
        loaded = read_json_or_set_aside(path, _convert)
        self._rows: list[CompatRow] = loaded.rows[-max_rows:] if loaded else []

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, *, model_id: str, backend: str, outcome: Outcome, event: str,
               reason: str = "", backend_version: str = "", path: str = "") -> CompatRow:
        row = CompatRow(ts=time.time(), model_id=model_id, backend=backend,
                        backend_version=backend_version or installed_backend_version(backend),
                        outcome=outcome, event=event, reason=reason, path=path)
        self._rows.append(row)
        del self._rows[:-self.max_rows]
        try:
            write_json_atomic(self.path, RegistryFile(rows=self._rows))
        except OSError as exc:  # the ledger must never fail a load
            log.error("cannot write %s: %s", self.path, exc)
        return row

    def query(self, model_id: str | None = None, outcome: str | None = None
              ) -> list[CompatRow]:
        return [r for r in self._rows
                if (model_id is None or r.model_id == model_id)
                and (outcome is None or r.outcome == outcome)]

    @staticmethod
    def summary(rows: list[CompatRow]) -> dict[str, Any]:
        by_model: defaultdict[str, Counter[str]] = defaultdict(Counter)
        by_backend: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for r in rows:
            by_model[r.model_id][r.outcome] += 1
            by_backend[f"{r.backend} {r.backend_version}".strip()][r.outcome] += 1

        def counts(c: Counter[str]) -> dict[str, int]:
            return {"pass": c["pass"], "fail": c["fail"], "total": c["pass"] + c["fail"]}

        return {
            "total": len(rows),
            "by_outcome": dict(Counter(r.outcome for r in rows)),
            "by_model": {k: counts(v) for k, v in sorted(by_model.items())},
            "by_backend": {k: counts(v) for k, v in sorted(by_backend.items())},
        }
