"""What the routes share: config, supervisor, counters. Stored on
`app.state.lmx` by the lifespan; no module-level globals."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.requests import Request

from lmx_gateway.inference.presets import PresetSet
from lmx_gateway.observability.events import EventBus
from lmx_gateway.observability.metrics import Metrics
from lmx_gateway.responses.store import ResponseStore
from lmx_supervisor.config import Config, ConfigSource
from lmx_supervisor.models.model_files import ModelFiles
from lmx_supervisor.supervisor import Supervisor
from lmx_supervisor.tuning.autotune import AutotuneJobs
from lmx_supervisor.tuning.quantize_jobs import QuantizeJobs


@dataclass
class GatewayState:
    config: Config
    supervisor: Supervisor
    events: EventBus
    started_monotonic: float = field(default_factory=time.monotonic)
    # Where `config` was read from; POST /admin/config/reload reads it again.
    config_source: ConfigSource = field(default_factory=ConfigSource)
    presets: PresetSet = field(default_factory=PresetSet)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Prometheus registry and request totals (observability/metrics.py).
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0
    # Inventory, downloads and deletion (lmx_supervisor/models/model_files.py).
    model_files: ModelFiles | None = None
    # Quantize jobs in child processes (lmx_supervisor/tuning/quantize_jobs.py).
    quantize_jobs: QuantizeJobs | None = None
    # Autotune jobs and the profile store (lmx_supervisor/tuning/autotune.py).
    autotune_jobs: AutotuneJobs | None = None
    # /v1/responses kept for previous_response_id (responses/store.py).
    responses: ResponseStore = field(default_factory=ResponseStore)

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_monotonic


def gateway_state(request: Request) -> GatewayState:
    state = request.app.state.lmx
    assert isinstance(state, GatewayState)
    return state
