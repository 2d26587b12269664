"""`moska serve`: build the engine and the app, run uvicorn until interrupted."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from moska.server.settings import DEFAULT_MAX_BODY_BYTES, ServerSettings

logger = logging.getLogger(__name__)


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    libraries: Sequence[str] = (),
    ttft_slo: float | None = None,
    max_queue: int | None = 256,
    *,
    demo_library: bool = True,
    engine_kwargs: dict[str, Any] | None = None,
    served_model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Serve `model` (None: the built-in tiny model) over HTTP. `libraries` must exist
    (built with `moska library build` or POST /v1/libraries); with no model and
    `demo_library`, the demo library from the bundled documents is built if missing."""
    import uvicorn

    from moska.engine.llm_engine import LLMEngine
    from moska.server.app import create_app

    settings = ServerSettings(
        host=host,
        port=port,
        api_key=api_key or None,
        ttft_slo=ttft_slo,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        served_model_name=served_model_name,
        log_level=log_level,
    )
    engine = LLMEngine.from_model(model, **(engine_kwargs or {}))
    prepare_libraries(engine, libraries, demo=demo_library and model is None)
    captured = engine.capture_graphs()  # 0 on CPU and with --enforce-eager
    if captured:
        logger.info("captured %d decode CUDA graphs", captured)
    app = create_app(engine, settings)
    logger.info("moska serving %s on http://%s:%d", engine.model_name, host, port)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.shutdown_drain_s),
    )


def prepare_libraries(engine: Any, names: Sequence[str], *, demo: bool) -> None:
    """Check that each named library exists (loading it where the manager can), and build
    the demo library when asked and possible. Raises ValueError for a missing library."""
    manager = getattr(engine, "libraries", None)
    if manager is None:
        if names:
            raise ValueError("this engine has no library manager; serve without --library")
        return
    if demo:
        try:
            from moska.library.demo import ensure_demo_library
        except ImportError:
            logger.info("no demo library available in this build")
        else:
            manager.get(ensure_demo_library(manager).name)  # loaded now: graphs capture it
    for name in names:
        manager.get(name)  # loads it now (checksums, fingerprint) rather than on first use
