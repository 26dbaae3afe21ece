"""The application factory. The lifespan owns the supervisor: it starts
before the first request and stops every worker after the last.

Routes: each module's `ROUTES` list holds `ScopedRoute`s (`access.scopes`), one
line per route with its scope (PUBLIC / INFERENCE / ADMIN); add the list to
`build_routes` below. A route that is not a ScopedRoute is refused at
startup, and `GET /openapi.json` describes every route from the same table.

Middleware, outermost first: request id; Host check (421); CORS for
`server.cors_origins`; load shedding. Each route then checks the browser
Origin and its scope's key before its handler (`access.guards`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware

from lmx_gateway.access.edge import HostCheckMiddleware, LiveCORSMiddleware
from lmx_gateway.access.scopes import build_routes
from lmx_gateway.admin import compatibility as routes_compatibility
from lmx_gateway.admin import dashboard as routes_dashboard
from lmx_gateway.admin import memory as routes_memory
from lmx_gateway.admin import model_files as routes_model_files
from lmx_gateway.admin import models as routes_admin
from lmx_gateway.admin import performance as routes_performance
from lmx_gateway.admin import probe as routes_probe
from lmx_gateway.admin import quantize as routes_quantize
from lmx_gateway.admin import restart as routes_restart
from lmx_gateway.admin.control import ROUTES as CONTROL_ROUTES
from lmx_gateway.anthropic import routes as routes_anthropic
from lmx_gateway.encoders.routes import ROUTES as ENCODER_ROUTES
from lmx_gateway.http.errors import EXCEPTION_HANDLERS
from lmx_gateway.http.load_shedding import LoadSheddingMiddleware
from lmx_gateway.http.request_context import RequestContextMiddleware
from lmx_gateway.inference.presets import load_presets
from lmx_gateway.observability import probes as routes_health
from lmx_gateway.observability import routes as routes_observability
from lmx_gateway.observability.events import EventBus
from lmx_gateway.observability.observers import Observers
from lmx_gateway.ollama.routes import ROUTES as OLLAMA_ROUTES
from lmx_gateway.openai import routes as routes_inference
from lmx_gateway.openapi import ROUTES as OPENAPI_ROUTES
from lmx_gateway.responses import routes as routes_responses
from lmx_gateway.responses.store import ResponseStore
from lmx_gateway.state import GatewayState
from lmx_supervisor.config import Config, ConfigSource
from lmx_supervisor.lifecycle.startup import startup_loads
from lmx_supervisor.models.downloads import DownloadManager
from lmx_supervisor.models.model_files import ModelFiles
from lmx_supervisor.supervisor import Supervisor
from lmx_supervisor.tuning.autotune import AutotuneJobs
from lmx_supervisor.tuning.quantize_jobs import QuantizeJobs

log = logging.getLogger("lmx.gateway")


def create_app(config: Config, config_source: ConfigSource | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events = EventBus()
        supervisor = Supervisor(config, emit=events.publish)
        await supervisor.start()
        # Counts this start; three unclean starts in 60 s mean safe mode.
        verdict = supervisor.runtime_state.begin_startup()
        app.state.lmx = GatewayState(
            config=config, supervisor=supervisor, events=events,
            config_source=config_source or ConfigSource(),
            presets=await asyncio.to_thread(load_presets),
            model_files=ModelFiles(supervisor, DownloadManager(events.publish)),
            quantize_jobs=QuantizeJobs(events.publish),
            autotune_jobs=AutotuneJobs(supervisor, events.publish),
            responses=ResponseStore(config.server.responses_store_max_entries,
                                    config.server.responses_store_max_bytes))
        observers = Observers(app.state.lmx)  # metrics, lifecycle logs, throughput
        # Load in the background: /healthz answers (and /readyz says 503)
        # while models are still loading.
        # auto_load, then the models the previous run had loaded (runtime
        # state); neither in safe mode.
        loader = asyncio.create_task(startup_loads(supervisor, verdict), name="lmx-auto-load")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if app.state.lmx.model_files is not None:  # cancel downloads
                await app.state.lmx.model_files.shutdown()
            if app.state.lmx.quantize_jobs is not None:  # kill running quantizers
                await app.state.lmx.quantize_jobs.shutdown()
            if app.state.lmx.autotune_jobs is not None:  # stop measuring workers
                await app.state.lmx.autotune_jobs.shutdown()
            log.info("stopping all workers")
            await supervisor.shutdown()
            # A clean shutdown resets the crash-loop counter.
            supervisor.runtime_state.mark_clean_shutdown()
            await observers.stop()

    return Starlette(
        routes=build_routes(
            CONTROL_ROUTES,
            routes_health.ROUTES, routes_inference.ROUTES, routes_anthropic.ROUTES,
            routes_responses.ROUTES, OLLAMA_ROUTES,
            ENCODER_ROUTES,
            # Before routes_admin/model_files: /admin/models/compatibility
            # must not be taken for a model id.
            routes_memory.ROUTES, routes_compatibility.ROUTES, routes_admin.ROUTES,
            routes_probe.ROUTES, routes_quantize.ROUTES, routes_performance.ROUTES,
            routes_restart.ROUTES,
            routes_dashboard.ROUTES, routes_observability.ROUTES,
            routes_model_files.ROUTES, OPENAPI_ROUTES),
        # Outermost first: every request gets its id before anything can
        # refuse it; a foreign Host is refused before anything else runs;
        # load shedding refuses before a route does any work.
        middleware=[Middleware(RequestContextMiddleware),
                    Middleware(HostCheckMiddleware, initial_config=config),
                    Middleware(LiveCORSMiddleware, initial_config=config),
                    Middleware(LoadSheddingMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
