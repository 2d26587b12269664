"""Building an engine from a model directory: the model loaded on one process, or with
tensor-parallel ranks or shared-KV ranks started beside it, and its library manager."""

from __future__ import annotations

import logging
from typing import Any

from moska.config import EngineConfig

logger = logging.getLogger(__name__)


def load_engine(cls: Any, model: str | None = None, **kwargs: Any) -> Any:
    """`cls` (LLMEngine) built on `model` (an HF directory; None for the built-in tiny
    model); keyword arguments are EngineConfig fields."""
    from moska.model import load_model
    from moska.model.default import DEFAULT_MODEL_NAME, default_model_dir

    config = EngineConfig(model=model, **kwargs)
    path = model if model is not None else default_model_dir()
    dtype = None if config.dtype == "auto" else config.dtype
    device = config.resolved_device()
    bind_cuda_device(device)
    if str(device).startswith("cuda") and dtype is None and model is None:
        dtype = "bfloat16"
    if config.helix:  # KV-parallel attention, tensor-parallel FFN (distributed/helix.py)
        from moska.distributed.helix_engine import start_helix

        loaded, runtime, libraries = start_helix(config, path, dtype, device)
    elif config.decode_context_parallel_size > 1:  # requests' KV sharded over ranks
        from moska.distributed.kv_parallel_engine import start_kv_parallel
        from moska.distributed.kv_parallel_step import KVParallelConfigError

        if config.flexicache is not None:  # per-head page lists over one rank's cache only
            raise KVParallelConfigError(
                "--flexicache does not run with --decode-context-parallel-size > 1 (its "
                "per-head page lists read one rank's KV cache); drop one of the two flags"
            )

        loaded, runtime, libraries = start_kv_parallel(config, path, dtype, device)
    elif config.tensor_parallel_size > 1:
        from moska.distributed.launch import start_tensor_parallel

        # ranks 1..N-1 in their own processes; None here means this process served as
        # one of them (under torchrun) and rank 0 has stopped
        started = start_tensor_parallel(config, path, dtype, device)
        if started is None:
            raise SystemExit(0)
        loaded, runtime = started
        from moska.distributed.tp_library import make_library_manager as tp_libraries

        libraries = tp_libraries(config, loaded, runtime)  # each rank: its heads
    elif config.shared_kv_ranks:  # libraries' chunks on processes of their own
        from moska.distributed.shared_kv_engine import start_shared_kv

        loaded, runtime, libraries = start_shared_kv(config, path, dtype, device)
    else:
        loaded, runtime = load_model(path, dtype=dtype, device=device), None
        libraries = make_library_manager(config, loaded, device)
    if loaded.tokenizer is None:
        logger.warning("no tokenizer: only token-id prompts are accepted")
    try:
        engine = cls(config, loaded, libraries)
    except Exception as exc:
        if runtime is None:
            raise
        failed = runtime.failure_after(exc)  # a rank that died while loading
        runtime.shutdown()
        if failed is not None:
            raise failed from exc
        raise
    engine.dist = runtime
    engine.runner.attention.shared_kv = getattr(libraries, "shared_kv", None)
    if model is None:
        engine.model_name = DEFAULT_MODEL_NAME
    return engine


def bind_cuda_device(device: Any) -> None:
    """Make `cuda:N` the calling thread's current device: Triton launches, CUDA graph
    pools and `torch.cuda.current_device()` users follow the current device, not the
    tensors, so an engine on cuda:1 must compute with cuda:1 current (also in its step
    thread). No-op for cpu and a plain `cuda`."""
    text = str(device)
    if text.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(text))


def make_library_manager(config: EngineConfig, loaded: Any, device: Any) -> Any:
    """The engine's LibraryManager over the configured (or default) store root."""
    try:
        from moska.library.manager import LibraryManager, default_library_root
    except ImportError:  # the library package is optional for plain generation
        return None
    root = config.library_root or default_library_root()
    return LibraryManager(
        root, loaded, device, tiers=config.tier_config, fp8_attention=config.fp8_attention
    )
