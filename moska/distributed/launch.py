"""Start a tensor-parallel engine's ranks and load rank 0's slice (LLMEngine.from_model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moska.config import EngineConfig
from moska.distributed.errors import TensorParallelConfigError
from moska.distributed.runtime import DistributedRuntime, rank_device, torchrun_rank
from moska.distributed.step_channel import StepChannel
from moska.distributed.tensor_parallel import ShardPlan, TensorParallel
from moska.distributed.worker import run_worker_from_env
from moska.model.config import ModelConfig


def start_tensor_parallel(config: EngineConfig, path, dtype, device: str):
    """(LoadedModel of rank 0's slice, DistributedRuntime) after starting ranks
    1..N-1; None when this process was one of those ranks (under torchrun) and has served
    until rank 0 stopped. Raises TensorParallelConfigError before starting anything when
    the model cannot be split that way."""
    from moska.model import load_model

    n = config.tensor_parallel_size
    if config.shared_kv_ranks:  # the TP ranks beside shared-KV ranks (torchrun too)
        from moska.distributed.tp_shared_kv import start_tp_shared_kv

        return start_tp_shared_kv(config, path, dtype, device)
    rank = torchrun_rank()
    if rank is not None and rank != 0:
        run_worker_from_env(path, dtype, device, config)
        return None
    if config.tier_config is not None:  # a library in tiers is loaded whole
        raise TensorParallelConfigError(
            "library tiers (library_gpu_budget) do not run with tensor parallelism yet; "
            "leave library_gpu_budget unset: each rank holds its KV heads of a library"
        )
    model_config = ModelConfig.from_file(Path(path) / "config.json")
    for r in range(n):  # every rank's split is valid, or fail here in one line
        ShardPlan.build(model_config, r, n)
    runtime = DistributedRuntime.start(n, device, (path, dtype, device, config))
    try:
        dev = rank_device(device, 0)
        tp = TensorParallel(runtime.groups.comm)
        loaded = load_model(path, dtype=dtype, device=dev, tensor_parallel=tp)
        model: Any = loaded.model  # a TensorParallelCausalLM
        runtime.channel = StepChannel(
            runtime.groups.comm, runtime.groups.control, dev, model.config.hidden_size, model.dtype
        )
        model.driver = runtime.channel
    except BaseException:
        runtime.shutdown()
        raise
    return loaded, runtime
