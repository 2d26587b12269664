"""`moska serve`: check the address and the device, build the engine and the app, report
what was loaded, run uvicorn until interrupted.

The port is bound before anything slow happens, so a busy port (or a missing GPU) fails in
one line in a second rather than after the model has loaded.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from moska.server.settings import DEFAULT_MAX_BODY_BYTES, ServerSettings

logger = logging.getLogger(__name__)


class AddressInUseError(ValueError):
    """The host:port `moska serve` should listen on is taken or cannot be bound."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: one the OS picks), not yet listening:
    uvicorn listens on it once the app is ready. Raises AddressInUseError."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise AddressInUseError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = "; stop the other server or pass another --port" if port else ""
        raise AddressInUseError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


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
    chat_template: str | None = None,
    max_tokens_default: int | None = None,
    log_level: str = "info",
    pd: Any = None,
    retry_bookings: bool = True,
) -> None:
    """Serve `model` (None: the built-in tiny model) over HTTP. `libraries` must exist
    (built with `moska library build` or POST /v1/libraries); with no model and
    `demo_library`, the demo library from the bundled documents is built if missing.
    `chat_template`: a Jinja file or inline template replacing the model's.
    `max_tokens_default`: the cap on max_tokens when a request gives none.
    `retry_bookings`: a 429 books its request's retry (server/bookings.py)."""
    from moska.config import EngineConfig

    settings = ServerSettings(
        host=host,
        port=port,
        api_key=api_key or None,
        ttft_slo=ttft_slo,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        served_model_name=served_model_name,
        max_tokens_default=max_tokens_default,
        log_level=log_level,
        retry_bookings=retry_bookings,
    )
    engine_kwargs = engine_kwargs or {}
    ranks = max(  # the processes of one engine (Helix: the larger of the two)
        engine_kwargs.get("tensor_parallel_size", 1),
        engine_kwargs.get("decode_context_parallel_size", 1),
    ) + engine_kwargs.get("shared_kv_ranks", 0)
    if ranks > 1 and os.environ.get("RANK", "0") != "0":
        # torchrun started this process as a rank other than 0: no socket and no HTTP; it
        # runs the forwards rank 0 sends (a TP rank: distributed/worker.py; a shared-KV
        # rank: shared_kv_rank.py) and exits when rank 0 stops
        from moska.engine.llm_engine import LLMEngine

        LLMEngine.from_model(model, **engine_kwargs)
        return
    sock = bind_socket(host, port)  # first: a busy port fails in a fraction of a second
    try:
        EngineConfig(model=model, **engine_kwargs).check_device()  # before the model loads
        import uvicorn

        app = _build_app(model, settings, libraries, demo_library, engine_kwargs, chat_template)
        if pd is not None:  # --role prefill|decode|both (moska/pd/instance.py)
            from moska.pd.instance import attach

            attach(app, pd)
        bound_port = sock.getsockname()[1]
        logger.info(
            "serving %s on http://%s:%d (OpenAI API under /v1, docs at /docs)",
            app.state.moska.model_name,
            host,
            bound_port,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=bound_port,
            log_level=log_level,
            timeout_graceful_shutdown=int(settings.shutdown_drain_s),
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _build_app(
    model: str | None,
    settings: ServerSettings,
    libraries: Sequence[str],
    demo_library: bool,
    engine_kwargs: dict[str, Any],
    chat_template: str | None,
) -> Any:
    from tqdm.auto import tqdm

    from moska.engine.llm_engine import LLMEngine
    from moska.engine.memory import library_report
    from moska.server.app import create_app

    logger.info("loading model %s", model or "moska-tiny (built in, random weights)")
    t0 = time.perf_counter()
    with tqdm(total=1, desc="loading the model", unit="model") as bar:  # shards: a bar inside
        engine = LLMEngine.from_model(model, **engine_kwargs)
        bar.update()
    if chat_template is not None:
        if engine.tokenizer is None:
            raise ValueError("--chat-template needs a model with a tokenizer (tokenizer.json)")
        engine.tokenizer.set_chat_template(chat_template)
    log_engine(engine, time.perf_counter() - t0)
    prepare_libraries(engine, libraries, demo=demo_library and model is None)
    report = library_report(engine)  # engine/memory.py: the library cache's share
    if report:
        logger.info("%s", report)
    captured = engine.capture_graphs()  # a labelled progress bar; 0 on CPU / --enforce-eager
    if captured:
        logger.info("captured %d decode CUDA graphs", captured)
    return create_app(engine, settings)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"


def log_engine(engine: Any, load_seconds: float) -> None:
    """Log what was loaded: path, architecture, dtype, parameters, device, memory."""
    params = list(engine.loaded.model.parameters())
    num_params = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    cfg = engine.model_config
    logger.info(
        "model %s: %s, %s, %s parameters, loaded in %.1f s",
        engine.loaded.path,
        getattr(cfg, "architecture", "?"),
        str(params[0].dtype).removeprefix("torch."),
        _count(num_params),
        load_seconds,
    )
    cache = engine.runner.cache
    kv_bytes = cache.k.nbytes + cache.v.nbytes
    logger.info(
        "device %s; weights %s, KV cache %s (%d blocks of %d tokens = %d tokens), "
        "context %d tokens, up to %d requests per step",
        _device_name(engine.device),
        _gib(weight_bytes),
        _gib(kv_bytes),
        engine.runner.num_blocks,
        engine.config.block_size,
        engine.runner.num_blocks * engine.config.block_size,
        engine.max_model_len,
        engine.config.max_num_seqs,
    )


def _device_name(device: Any) -> str:
    if getattr(device, "type", None) == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


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
            from moska.library.demo import DEMO_LIBRARY_NAME, ensure_demo_library
        except ImportError:
            logger.info("no demo library available in this build")
        else:
            _ensure_demo(manager, ensure_demo_library, DEMO_LIBRARY_NAME)
    for name in names:
        manager.get(name)  # loads it now (checksums, fingerprint) rather than on first use
    for name in manager.loaded_names():
        lib = manager.get(name)
        size = _gib(lib.nbytes) if hasattr(lib, "nbytes") else "?"
        logger.info(
            "library %s: %d tokens in %d chunks, %s", name, lib.num_tokens, lib.num_chunks, size
        )
    if not manager.loaded_names():
        logger.info("no libraries loaded (root %s)", getattr(manager, "root", "?"))


def _ensure_demo(manager: Any, ensure: Any, name: str) -> None:
    from tqdm.auto import tqdm

    first = not manager.exists(name)
    desc = "building the demo library (first start only)" if first else "loading the demo library"
    with tqdm(total=1, desc=desc, unit="library", leave=True) as bar:
        manager.get(ensure(manager).name)  # loaded now: graphs capture it
        bar.update()
