"""Turns the supervisor's lifecycle events into the two files that outlive
the process: the compatibility ledger (a row per load outcome and per
crash) and the runtime state's list of loaded models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.lifecycle.runtime_state import LoadedModelRecord, RuntimeStateStore
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.models.compatibility import CompatibilityRegistry
from lmx_supervisor.workers.shard_group import shard_nodes

# A model in these states is one the operator wants loaded: a restart of the
# server should bring it back (BACKOFF: crashed, about to be restarted).
WANTED = (ModelState.READY, ModelState.BACKOFF)
# Events after which the set of wanted models may have changed.
MEMBERSHIP_EVENTS = frozenset({"model_loaded", "model_unloaded", "model_quarantined",
                               "model_evicted", "model_restarted"})


def loaded_records(models: list[ManagedModel]) -> list[LoadedModelRecord]:
    return [LoadedModelRecord(model_id=m.model_id, path=str(m.path), backend=m.backend,
                              served_name=m.model_id,
                              settings=dict(m.spawn_overrides) or None,
                              shards=shard_nodes(m.placement))
            for m in models if m.state in WANTED]


class LifecycleRecorder:
    def __init__(self, compatibility: CompatibilityRegistry, runtime_state: RuntimeStateStore,
                 models: Callable[[], list[ManagedModel]]) -> None:
        self.compatibility = compatibility
        self.runtime_state = runtime_state
        self._models = models

    def _backend_of(self, model_id: str) -> tuple[str, str]:
        for m in self._models():
            if m.model_id == model_id:
                return m.backend, m.ready.backend_version if m.ready else ""
        return "", ""

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        model_id = str(data.get("model_id", ""))
        if event == "model_loaded":
            self.compatibility.record(
                model_id=model_id, backend=str(data.get("backend", "")), outcome="pass",
                event="load", reason="loaded",
                backend_version=str(data.get("backend_version") or ""),
                path=str(data.get("path", "")))
        elif event == "model_load_failed":
            self.compatibility.record(
                model_id=model_id, backend=str(data.get("backend", "")), outcome="fail",
                event="load", reason=f"{data.get('code')}: {data.get('reason')}",
                path=str(data.get("path", "")))
        elif event == "worker_crashed":
            backend, version = self._backend_of(model_id)
            self.compatibility.record(
                model_id=model_id, backend=backend, outcome="fail", event="crash",
                reason=("out_of_memory: " if data.get("oom") else "")
                + str(data.get("cause", "")), backend_version=version)
        if event in MEMBERSHIP_EVENTS:
            self.sync()

    def sync(self) -> None:
        self.runtime_state.set_loaded(loaded_records(self._models()))

    def freeze(self) -> None:
        self.runtime_state.freeze(loaded_records(self._models()))
