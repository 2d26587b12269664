"""The FastAPI app factory: `create_app(engine, settings)`."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from moska import __version__
from moska.engine.protocol import ServedEngine
from moska.server import storm_anchor
from moska.server.admission import AdmissionController, EngineLimits
from moska.server.admission_bookings import spaced_by_default
from moska.server.async_engine import AsyncEngine
from moska.server.build_worker import BuildWorker
from moska.server.errors import install_error_handlers
from moska.server.library_routes import router as library_router
from moska.server.load_shedding import LoadSheddingMiddleware
from moska.server.metrics import ServerMetrics
from moska.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from moska.server.openai_routes import router as openai_router
from moska.server.protocol import LIBRARY_NAME_PATTERN
from moska.server.settings import ServerSettings
from moska.server.state import ServerState, StateDep
from moska.server.tokenizer_pool import TokenizerPool
from moska.server.util_routes import router as util_router


def engine_defaults(admission: AdmissionController, engine: ServedEngine) -> None:
    """The admission settings that depend on where `engine` runs: `storm_bound` on a GPU
    engine (`storm_anchor.bound_by_default`), `space_by_booked` on a CPU one
    (`admission_bookings.spaced_by_default`)."""
    admission.storm_bound = storm_anchor.bound_by_default(engine)
    admission.space_by_booked = spaced_by_default(engine)


def create_app(
    engine: ServedEngine,
    settings: ServerSettings | None = None,
    *,
    admission: AdmissionController | None = None,
) -> FastAPI:
    """An app serving `engine`. The engine loop thread starts with the app's lifespan
    and stops (draining in-flight requests) when the app shuts down."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    if admission is None:
        limits = EngineLimits.of(engine)
        admission = AdmissionController(settings.ttft_slo, settings.max_queue, limits=limits)
        engine_defaults(admission, engine)
    admission.bookings.enabled = settings.retry_bookings
    metrics.watch_bookings(admission.bookings)
    state = ServerState(
        engine=engine,
        settings=settings,
        metrics=metrics,
        admission=admission,
        async_engine=AsyncEngine(engine, metrics=metrics, admission=admission),
        tokenizers=TokenizerPool(
            engine.tokenizer,
            int(engine.max_model_len),
            workers=settings.tokenizer_workers,
            max_prompt_chars=settings.max_prompt_chars,
            max_pending_chars=settings.max_tokenize_pending_chars,
        ),
    )
    libraries = engine.libraries
    if libraries is not None:
        metrics.watch_library_tiers(libraries.tier_stats)  # tiered libraries' counters
        state.builds = BuildWorker(
            libraries,
            max_tokens=settings.max_build_tokens,
            max_concurrent=settings.max_concurrent_builds,
            max_queued=settings.max_queued_builds,
            prefill_tokens=settings.build_prefill_tokens,
            in_process=settings.build_in_process,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if settings.gil_switch_interval_s is not None:
            # The engine thread and the event loop share one GIL. Python hands it over
            # every 5 ms by default, so under a burst each torch op of the engine thread
            # waited up to 5 ms for the loop to let go of it and a 5 ms step took
            # hundreds; a shorter interval gives it back sooner.
            sys.setswitchinterval(settings.gil_switch_interval_s)
        if settings.gc_freeze:
            # A full collection scans every object alive, and loading the model, libraries
            # and graphs leaves many: on the GPU load bench one paused both threads for
            # 0.20-0.31 s inside bursts of ~5 ms steps (0.01-0.09 s frozen; session 25).
            # Frozen, they are never scanned again; what the server allocates later is.
            gc.collect()
            gc.freeze()
        state.async_engine.start()
        state.tokenizers.warm()
        lag_watch = asyncio.create_task(state.loop_lag.run())
        try:
            yield
        finally:
            lag_watch.cancel()
            if settings.gc_freeze:  # what was frozen may be collected again once it dies
                gc.unfreeze()
            if state.builds is not None:  # running builds stop at their next prefill piece
                await asyncio.to_thread(state.builds.shutdown)
            await state.async_engine.shutdown(settings.shutdown_drain_s)
            state.tokenizers.shutdown()

    app = FastAPI(
        title="moska",
        summary="OpenAI-compatible server for shared long-context inference (MoSKA)",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.moska = state
    install_error_handlers(app)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # outermost: under a burst, a 429 costs neither the body limit's reads nor auth
    app.add_middleware(
        LoadSheddingMiddleware,
        shed=lambda: _shed(state),
        on_429=lambda d: state.metrics.rejections.labels(d.verdict.value).inc(),
    )
    app.include_router(openai_router)
    app.include_router(library_router)
    app.include_router(util_router)
    app.openapi = _openapi_with_limits(app.openapi, settings)  # type: ignore[method-assign]

    @app.get("/health")
    async def health(state: StateDep) -> JSONResponse:
        aengine = state.async_engine
        ok = aengine.alive and aengine.accepting
        body = {"status": "ok" if ok else "unavailable", "failed_steps": aengine.failed_steps}
        load = aengine.load()
        body |= {"num_waiting": load.num_waiting, "num_running": load.num_running}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics_route(state: StateDep) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return app


def _openapi_with_limits(
    build: Callable[[], dict[str, Any]], settings: ServerSettings
) -> Callable[[], dict[str, Any]]:
    """FastAPI's `app.openapi`, with this server's real limits where the request models are
    looser than the checks the routes make: `n` and `best_of` up to `settings.max_n`, and
    library names (a request's `library`, the `{name}` in a path) matching the library name
    pattern.
    Clients and fuzzers generating from the schema then send what the server accepts."""
    patched: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if patched:
            return patched[0]
        schema = build()  # FastAPI caches it in app.openapi_schema; patched in place
        for model in schema.get("components", {}).get("schemas", {}).values():
            props = model.get("properties", {})
            if not {"prompt", "messages"} & props.keys():
                continue  # only generation and tokenize requests
            for name in ("n", "best_of"):
                _set_maximum(props.get(name), settings.max_n)
            for option in props.get("library", {}).get("anyOf", []):
                if option.get("type") == "string":
                    option["pattern"] = LIBRARY_NAME_PATTERN
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                for param in op.get("parameters", []):
                    if path.startswith("/v1/libraries/{name}") and param.get("name") == "name":
                        param["schema"]["pattern"] = LIBRARY_NAME_PATTERN
        patched.append(schema)
        return schema

    return openapi


def _set_maximum(prop: dict[str, Any] | None, maximum: int) -> None:
    for option in (prop or {}).get("anyOf", [prop] if prop else []):
        if option.get("type") == "integer":
            option["maximum"] = maximum


def _shed(state: ServerState):
    """The door's 429 (see load_shedding; counted like admission's own rejections when
    answered: a booked retry at its moment goes in instead)."""
    if not state.async_engine.accepting:
        return None  # shutting down: the route answers 503
    return state.admission.shed(state.async_engine.load(), state.loop_lag.now())
