"""The engine with decode context parallelism (`decode_context_parallel_size=P`, vLLM's name
for it): one long request's KV is sharded by blocks over P ranks (DistAttention), so a
request whose KV exceeds one rank's cache is served (kv_parallel_step.py: the layout and
the attention).

Rank 0 loads the whole model, owns the scheduler, the block manager (over every rank's
blocks) and the sampler, and starts ranks 1..P-1 itself (distributed/runtime.py: spawn,
rendezvous, heartbeats, the monitor). Each of them loads the whole model too and runs every
forward rank 0 sends over the step channel (FORWARD, then STOP at shutdown); logits are
computed on rank 0 only, so a step sends nothing else. Per layer the ranks all-gather their
attention partials (o [T, Hq, D], lse [T, Hq] fp32). Refused with a message that says what
to do: library requests (rank 0's library manager refuses them), tensor parallelism or
shared-KV ranks at once (config), semantic reuse. Under torchrun (`--nproc-per-node P`)
ranks 1..P-1 serve rank 0 and leave with SystemExit(0) when it stops.
"""

from __future__ import annotations

from typing import Any

import torch

from moska.config import EngineConfig
from moska.distributed.control_message import Command
from moska.distributed.kv_parallel_step import KVParallelConfigError, KVParallelModel
from moska.distributed.rank_processes import ParentLink
from moska.distributed.runtime import (
    DistributedRuntime,
    ProcessGroups,
    Rendezvous,
    rank_device,
    torchrun_rank,
)
from moska.distributed.step_channel import StepChannel
from moska.library.manager import LibraryManager


def start_kv_parallel(config: EngineConfig, path, dtype, device: str):
    """(LoadedModel, DistributedRuntime, library manager): start ranks 1..P-1, then load
    rank 0's model."""
    from moska.library.manager import default_library_root
    from moska.model import load_model

    if config.tensor_parallel_size > 1 or config.shared_kv_ranks or config.semantic_reuse:
        raise KVParallelConfigError(
            "decode_context_parallel_size > 1 runs without tensor_parallel_size, "
            "shared_kv_ranks and semantic_reuse for now (each of its ranks holds the whole "
            "model); drop one of them, or add helix=True (--helix) to split the model over "
            "tensor_parallel_size ranks with the KV sharded over decode_context_parallel_size"
        )
    if config.tier_config is not None:
        raise KVParallelConfigError(
            "library tiers (library_gpu_budget) do not run with decode_context_parallel_size "
            "> 1 (library requests are refused there); leave library_gpu_budget unset"
        )
    p = config.decode_context_parallel_size
    rank = torchrun_rank()
    if rank is not None and rank != 0:  # torchrun started this rank: serve rank 0, leave
        from moska.distributed.worker import join_torchrun, rank_lifecycle

        groups, dev = join_torchrun(p, device)
        with rank_lifecycle(groups, None):
            _serve(groups, str(path), dtype, dev, config)
        raise SystemExit(0)
    runtime = DistributedRuntime.start(
        p, device, (str(path), dtype, device, config), target=run_kv_rank
    )
    try:
        dev = rank_device(device, 0)
        loaded = load_model(
            path, dtype=dtype, device=dev, tensor_parallel=KVParallelModel(runtime.groups.comm)
        )
        model: Any = loaded.model
        runtime.channel = StepChannel(
            runtime.groups.comm, runtime.groups.control, dev, model.config.hidden_size, model.dtype
        )
        model.driver = runtime.channel
        root = config.library_root or default_library_root()
        libraries = KVParallelLibraries(root, loaded, dev)
    except BaseException:
        runtime.shutdown()
        raise
    return loaded, runtime, libraries


class KVParallelLibraries(LibraryManager):
    """Rank 0's library manager: lists, builds (on rank 0 alone, which holds the whole
    model) and deletes as usual, but no request may read a library (the other ranks would
    not hold it)."""

    def acquire(self, name: str):
        raise KVParallelConfigError(
            f"library {name!r}: library requests do not run with decode_context_parallel_size "
            "> 1 yet; serve libraries with decode_context_parallel_size=1 (the default)"
        )


def run_kv_rank(rdv: Rendezvous, rank: int, parent: ParentLink, model_path, dtype, device, config):
    """Entry point of a spawned KV-parallel rank (1..P-1)."""
    from moska.distributed.worker import join_spawned, rank_lifecycle

    groups, dev = join_spawned(rdv, rank, device)
    with rank_lifecycle(groups, parent):
        _serve(groups, model_path, dtype, dev, config)


@torch.inference_mode()
def _serve(groups: ProcessGroups, model_path, dtype, device: torch.device, config) -> None:
    from moska.engine.runner import ModelRunner
    from moska.model import load_model

    loaded = load_model(
        model_path, dtype=dtype, device=device, tensor_parallel=KVParallelModel(groups.comm)
    )
    model = loaded.model
    runner = ModelRunner(loaded, config, device)  # its cache: its shard of every request
    channel = StepChannel(
        groups.comm, groups.control, device, model.config.hidden_size, model.dtype
    )
    while True:
        msg = channel.recv()
        if msg.command is Command.STOP:
            return
        if msg.command is Command.FORWARD:
            assert msg.meta is not None and not msg.groups
            model(msg.input_ids, msg.positions, runner.attention.bind(msg.meta))
