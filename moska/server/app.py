"""The FastAPI app factory: `create_app(engine, settings)`."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from moska.server.admission import AdmissionController
from moska.server.async_engine import AsyncEngine
from moska.server.errors import install_error_handlers
from moska.server.library_routes import router as library_router
from moska.server.metrics import ServerMetrics
from moska.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from moska.server.openai_routes import router as openai_router
from moska.server.settings import ServerSettings
from moska.server.state import ServerState, StateDep


def create_app(
    engine: Any,
    settings: ServerSettings | None = None,
    *,
    admission: AdmissionController | None = None,
) -> FastAPI:
    """An app serving `engine`. The engine loop thread starts with the app's lifespan
    and stops (draining in-flight requests) when the app shuts down."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    admission = admission or AdmissionController(settings.ttft_slo, settings.max_queue)
    state = ServerState(
        engine=engine,
        settings=settings,
        metrics=metrics,
        admission=admission,
        async_engine=AsyncEngine(engine, metrics=metrics, admission=admission),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.async_engine.start()
        try:
            yield
        finally:
            await state.async_engine.shutdown(settings.shutdown_drain_s)

    app = FastAPI(
        title="moska",
        summary="OpenAI-compatible server for shared long-context inference (MoSKA)",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.moska = state
    install_error_handlers(app)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.include_router(openai_router)
    app.include_router(library_router)

    @app.get("/health")
    async def health(state: StateDep) -> JSONResponse:
        ok = state.async_engine.alive and state.async_engine.accepting
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics_route(state: StateDep) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return app
