"""The engine under Helix (`helix=True` with `decode_context_parallel_size=KVP` and, for
TPA > 1, `tensor_parallel_size=N`): N ranks, one process each, KV sharded by blocks over
KVP ranks and heads over N / KVP groups for attention, the FFN tensor-parallel over N
(helix.py: the layout and the attention).

Rank 0 loads its slice, owns the scheduler, the block manager (over a KVP group's blocks:
KVP x each rank's) and the sampler, and starts ranks 1..N-1 itself (runtime.py: spawn,
rendezvous, heartbeats, the monitor). They load their slices and run the commands rank 0
sends, as tensor-parallel workers do (worker.serve_steps: FORWARD, the logits gather,
STOP). Library requests: each rank loads its TPA group's KV heads of the library and
attends its part of the selections (helix_library.py). Refused with a message that says
what to do: library builds (each rank holds a slice of the weights), shared-KV ranks,
semantic reuse, FlexiCache, library tiers. Under torchrun (`--nproc-per-node` the ranks)
ranks 1..N-1 serve rank 0 and leave with SystemExit(0) when it stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moska.config import EngineConfig
from moska.distributed.comm import Collectives
from moska.distributed.helix import HelixConfigError, HelixLayout, HelixModel
from moska.distributed.helix_library import HelixLibraries, HelixWorkerLibraries
from moska.distributed.rank_processes import ParentLink
from moska.distributed.runtime import DistributedRuntime, Rendezvous, rank_device, torchrun_rank
from moska.distributed.step_channel import StepChannel
from moska.model.config import ModelConfig


def check_helix(config: EngineConfig, model_config: ModelConfig) -> HelixLayout:
    """The layout, or HelixConfigError before any process starts."""
    if config.shared_kv_ranks or config.semantic_reuse or config.flexicache is not None:
        raise HelixConfigError(
            "--helix runs without shared_kv_ranks, semantic_reuse and flexicache for now; "
            "drop one of them"
        )
    if config.tier_config is not None:
        raise HelixConfigError(
            "library tiers (library_gpu_budget) do not run with --helix (each rank holds "
            "its KV heads of a library in memory); leave library_gpu_budget unset"
        )
    layout = HelixLayout.from_engine(config)
    layout.check(model_config)
    return layout


def start_helix(config: EngineConfig, path, dtype, device: str):
    """(LoadedModel of rank 0's slice, DistributedRuntime, library manager): check the
    layout, start ranks 1..N-1, then load rank 0's slice."""
    from moska.library.manager import default_library_root
    from moska.model import load_model

    layout = check_helix(config, ModelConfig.from_file(Path(path) / "config.json"))
    rank = torchrun_rank()
    if rank is not None and rank != 0:  # torchrun started this rank: serve rank 0, leave
        from moska.distributed.worker import join_torchrun, rank_lifecycle

        groups, dev = join_torchrun(layout.world, device)
        with rank_lifecycle(groups, None):
            serve_helix(groups.comm, groups.control, str(path), dtype, dev, config)
        raise SystemExit(0)
    runtime = DistributedRuntime.start(
        layout.world, device, (str(path), dtype, device, config), target=run_helix_rank
    )
    try:
        dev = rank_device(device, 0)
        helix = HelixModel(runtime.groups.comm, layout, config.helix_microbatches)
        loaded = load_model(path, dtype=dtype, device=dev, tensor_parallel=helix)
        model: Any = loaded.model
        runtime.channel = StepChannel(
            runtime.groups.comm, runtime.groups.control, dev, model.config.hidden_size, model.dtype
        )
        model.driver = runtime.channel
        root = config.library_root or default_library_root()
        split = helix.head_split(model)
        libraries = HelixLibraries(root, loaded, dev, runtime.channel, split)
    except BaseException:
        runtime.shutdown()
        raise
    return loaded, runtime, libraries


def run_helix_rank(
    rdv: Rendezvous, rank: int, parent: ParentLink, model_path, dtype, device, config
):
    """Entry point of a spawned Helix rank (1..N-1)."""
    from moska.distributed.worker import join_spawned, rank_lifecycle

    groups, dev = join_spawned(rdv, rank, device)
    with rank_lifecycle(groups, parent):
        serve_helix(groups.comm, groups.control, model_path, dtype, dev, config)


def serve_helix(
    comm: Collectives, control: Any, model_path, dtype, device: torch.device, config
) -> None:
    """A rank other than 0: load its slice, then run rank 0's commands until STOP."""
    from moska.distributed.worker import serve_steps
    from moska.engine.runner import ModelRunner
    from moska.model import load_model

    helix = HelixModel(comm, HelixLayout.from_engine(config), config.helix_microbatches)
    loaded = load_model(model_path, dtype=dtype, device=device, tensor_parallel=helix)
    model = loaded.model
    runner = ModelRunner(loaded, config, device)  # its cache: its heads of its shard
    channel = StepChannel(comm, control, device, model.config.hidden_size, model.dtype)
    libraries = HelixWorkerLibraries(device, helix.head_split(model))
    serve_steps(model, runner.attention, channel, device, libraries)
