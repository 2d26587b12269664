"""Tensor parallelism beside shared-KV ranks (`tensor_parallel_size=N, shared_kv_ranks=M`):
N + M processes, ranks 0..N-1 the tensor-parallel group (the unique ranks: each holds its
slice of the weights and its KV heads of the requests' cache, as tensor_parallel.py), ranks
N..N+M-1 the shared ranks (no weights: their chunks of each library, all KV heads,
shared_kv_rank.py).

Groups: the model's collectives run on a subgroup of the N TP ranks (`Rendezvous.
model_ranks`); the shared-KV exchange (shared_kv.py, `SharedKVLayout(N, M, q_heads)`) on
the world group; every command goes over the world's control group, so one LOAD_LIBRARY
reaches both kinds of rank (a TP rank loads its KV heads' routing index, then drops their
KV; a shared rank reads its chunks), and a FORWARD naming library groups tells the shared
ranks how many attention calls follow (it stands for SHARED_STEP).

Per layer each TP rank routes its rows for its KV heads (`HeadSplit.select`: TP = 1's
picks for those heads, exchanging scores where a policy needs the other heads, as under
tensor parallelism alone: so the ranks' decisions together are one process's), sends each
selected chunk's query rows — its query heads only — to the chunk's holder, and merges the
(o, lse) of its heads that come back with its unique part by LSE, before the row-parallel
o_proj. The shared ranks hold whole KV heads (not per-head shards): a chunk's KV is one
contiguous read per rank, any N works with the same M ranks, and a shared rank's launch
covers every TP rank's heads at once (docs/distributed.md, "TP with shared-KV ranks").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moska.config import EngineConfig
from moska.distributed.runtime import DistributedRuntime, rank_device, torchrun_rank
from moska.distributed.shared_kv import SharedKVLayout, SharedKVSpec
from moska.distributed.shared_kv_engine import (
    SharedKVAttention,
    SharedKVChannel,
    SharedKVConfigError,
    SharedKVLibraries,
)
from moska.distributed.tensor_parallel import ShardPlan, TensorParallel
from moska.distributed.tp_library import TensorParallelLibraries, WorkerLibraries
from moska.library.loaded import LoadedLibrary
from moska.model.config import ModelConfig, parse_dtype


def engine_layout(config: ModelConfig, num_unique: int, num_shared: int) -> SharedKVLayout:
    """The exchange's layout: N TP ranks (each sends its query heads), then M shared."""
    if num_unique == 1:
        return SharedKVLayout(1, num_shared)
    heads = tuple(ShardPlan.build(config, r, num_unique).q_heads for r in range(num_unique))
    return SharedKVLayout(num_unique, num_shared, heads)


def rank_attention(model: Any, num_shared: int, channel: SharedKVChannel | None):
    """A TP rank's SharedKVAttention: its heads, its first KV head's global index."""
    full, plan, local = model.full_config, model.plan, model.config
    spec = SharedKVSpec(
        local.num_heads, local.num_kv_heads, local.head_dim, model.dtype, full.sm_scale
    )
    layout = engine_layout(full, plan.size, num_shared)
    return SharedKVAttention(spec, layout, channel, full.num_layers, kv_offset=plan.kv_heads[0])


def start_tp_shared_kv(config: EngineConfig, path, dtype, device: str):
    """(LoadedModel of rank 0's slice, DistributedRuntime) after starting TP ranks 1..N-1
    and the M shared ranks; `runtime.shared_kv` is rank 0's SharedKVAttention. None when
    torchrun started this process as another rank and it has served until rank 0 stopped."""
    from moska.model import load_model

    rank = torchrun_rank()
    if rank is not None and rank != 0:  # torchrun started this rank: serve rank 0
        serve_torchrun_rank(config, path, dtype, device)
        return None
    if config.tier_config is not None:
        raise SharedKVConfigError(
            "shared_kv_ranks holds each library's chunks on the shared ranks, not in tiers; "
            "leave library_gpu_budget unset"
        )
    n, m = config.tensor_parallel_size, config.shared_kv_ranks
    model_config = ModelConfig.from_file(Path(path) / "config.json")
    for r in range(n):  # every rank's split is valid, or fail here in one line
        ShardPlan.build(model_config, r, n)
    name = _dtype_name(model_config, dtype)
    runtime = DistributedRuntime.start(
        n + m, device, (str(path), dtype, name, device, config), run_rank, model_ranks=n
    )
    try:
        dev = rank_device(device, 0)
        loaded = load_model(path, dtype=dtype, device=dev, tensor_parallel=TensorParallel(
            runtime.groups.comm))  # fmt: skip
        model: Any = loaded.model
        channel = SharedKVChannel(
            runtime.groups.comm, runtime.groups.control, dev, model.config.hidden_size, model.dtype
        )
        runtime.channel = model.driver = channel
        remote = rank_attention(model, m, channel)
        remote.replica_slots = config.shared_kv_replica_slots
        runtime.shared_kv = remote
    except BaseException:
        runtime.shutdown()
        raise
    return loaded, runtime


def _dtype_name(model_config: ModelConfig, dtype) -> str:
    """The model's dtype as load_model resolves it ("auto": the checkpoint's, else fp32):
    the shared ranks size their buffers by it."""
    resolved = parse_dtype(
        model_config.torch_dtype or torch.float32 if dtype in (None, "auto") else dtype
    )
    return str(resolved).removeprefix("torch.")


def serve_torchrun_rank(config: EngineConfig, path, dtype, device: str) -> None:
    """A rank other than 0 that torchrun started (`shared_kv_ranks` M, with or without
    tensor parallelism): join rank 0's groups, serve as a TP rank (rank < N) or a shared
    rank until rank 0 stops, then return. torchrun must start N + M processes."""
    from moska.distributed.runtime import ProcessGroups, _torchrun_rendezvous, pick_backend
    from moska.distributed.shared_kv_rank import serve_shared
    from moska.distributed.worker import _serve, rank_lifecycle

    rank = torchrun_rank()
    assert rank is not None and rank != 0
    n, m = config.tensor_parallel_size, config.shared_kv_ranks
    first = rank_device(device, 0)  # the backends rank 0 picks
    model_backend = pick_backend(first, n) if n > 1 else ""
    rdv = _torchrun_rendezvous(n + m, pick_backend(first, n + m), n if n > 1 else 0, model_backend)
    groups = ProcessGroups.join(rdv, rank, host_store=False)
    dev = rank_device(device, rank)
    if rank < n:
        _serve(groups, path, dtype, dev, config, None, setup=_worker_libraries(config))
        return
    model_config = ModelConfig.from_file(Path(path) / "config.json")
    with rank_lifecycle(groups, None):
        serve_shared(groups, path, getattr(torch, _dtype_name(model_config, dtype)), dev, config)


def run_rank(rdv, rank: int, parent, model_path, dtype, dtype_name: str, device, config):
    """Entry point of a spawned rank: a TP rank below tensor_parallel_size, else shared."""
    from moska.distributed import worker
    from moska.distributed.shared_kv_rank import run_shared_rank

    if rank >= config.tensor_parallel_size:
        run_shared_rank(rdv, rank, parent, model_path, dtype_name, device, config)
        return
    groups, dev = worker.join_spawned(rdv, rank, device)
    worker._serve(groups, model_path, dtype, dev, config, parent, setup=_worker_libraries(config))


def _worker_libraries(config: EngineConfig):
    def setup(model, runner, channel) -> WorkerSharedLibraries:
        remote = rank_attention(model, config.shared_kv_ranks, None)
        runner.attention.shared_kv = remote
        return WorkerSharedLibraries(model, runner.device, remote, runner.attention.ops)

    return setup


def _drop_kv(library: LoadedLibrary) -> None:
    """The KV lives on the shared ranks: keep the shapes (routing reads them), no storage."""
    for pools in (library.k_pools, library.v_pools):
        for i, t in enumerate(pools):
            pools[i] = t.new_zeros(()).expand(t.shape)


class WorkerSharedLibraries(WorkerLibraries):
    """A TP rank other than 0: its KV heads' routing index of each build rank 0 names (no
    KV: that is on the shared ranks) and a client per build."""

    def __init__(self, model: Any, device, remote: SharedKVAttention, ops: Any) -> None:
        super().__init__(model, device)
        self.remote, self.ops = remote, ops

    def load(self, root: str, name: str, build_id: str) -> str | None:
        fresh = build_id not in self.builds
        error = super().load(root, name, build_id)
        if error is None and fresh:
            library = self.builds[build_id]
            _drop_kv(library)
            self.remote.add(library, self.ops)
        return error

    def unload(self, build_id: str) -> None:
        super().unload(build_id)
        self.remote.clients.pop(build_id, None)

    def place(self, info: dict | None) -> str | None:
        """PLACE_LIBRARY: rank 0 re-placed a build's chunks (hot-chunk replicas)."""
        from moska.distributed.partition import ChunkPlacement

        assert info is not None
        client = self.remote.clients.get(info["build"])
        if client is not None:
            holders = tuple(tuple(h) for h in info["holders"])
            client.placement = ChunkPlacement(len(holders), self.remote.layout.num_shared, holders)
        return None


class TensorParallelSharedKVLibraries(SharedKVLibraries):
    """Rank 0's LibraryManager: tensor parallelism's (its KV heads of each library, LOAD /
    UNLOAD to every rank, builds refused) with shared-KV ranks' (KV dropped here, a client
    per build, hot-chunk replicas)."""

    def __init__(self, root, loaded_model, device, channel, remote: SharedKVAttention) -> None:
        TensorParallelLibraries.__init__(self, root, loaded_model, device, channel)
        from moska.kernel_ops import kernel_ops

        self.shared_kv = remote
        self._ops = kernel_ops("auto", device)
        remote.replan = self._replan

    def reserve(self, name: str) -> Any:
        return TensorParallelLibraries.reserve(self, name)

    def build(self, name: str, *args: Any, **kwargs: Any):
        return TensorParallelLibraries.build(self, name, *args, **kwargs)

    def _register(self, name: str, library: LoadedLibrary) -> None:
        if self.split is not None and library.kv_heads == self.split.heads:
            library.head_split = self.split
        SharedKVLibraries._register(self, name, library)
