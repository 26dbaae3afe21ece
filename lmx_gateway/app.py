"""The application factory. The lifespan owns the supervisor: it starts
before the first request and stops every worker after the last."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from lmx_gateway import routes_admin, routes_dashboard, routes_health, routes_inference
from lmx_gateway.errors import EXCEPTION_HANDLERS
from lmx_gateway.events import EventBus
from lmx_gateway.state import GatewayState
from lmx_supervisor.config import Config
from lmx_supervisor.supervisor import Supervisor

log = logging.getLogger("lmx.gateway")


def create_app(config: Config) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events = EventBus()
        supervisor = Supervisor(config, emit=events.publish)
        await supervisor.start()
        app.state.lmx = GatewayState(config=config, supervisor=supervisor, events=events)
        # Load in the background: /healthz answers (and /readyz says 503)
        # while models are still loading.
        loader = asyncio.create_task(supervisor.auto_load(), name="lmx-auto-load")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            log.info("stopping all workers")
            await supervisor.shutdown()

    return Starlette(
        routes=[*routes_health.ROUTES, *routes_inference.ROUTES, *routes_admin.ROUTES,
                *routes_dashboard.ROUTES],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
