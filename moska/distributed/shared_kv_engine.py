"""The engine with shared-KV ranks (`shared_kv_ranks=M`, MoSKA disaggregation): rank 0 runs
the whole model, the scheduler and each library's routing index; M processes it starts
itself (distributed/runtime.py: spawn, rendezvous, heartbeats, the monitor) hold the
libraries' chunks, partitioned by `ChunkPlacement.by_chunk_id`, and no model weights
(distributed/shared_kv_rank.py).

Per forward with library rows: `PagedAttention.bind` tells the shared ranks (SHARED_STEP on
the control group) the builds of the step's groups and how many attention calls follow
(layers x groups); then at every layer each group's rows are routed here and
`SharedKVClient.attend` sends each selected chunk's query rows to its holder and merges the
(o, lse) that come back into one state per (row, KV head), which the attention merges with
the unique part as for a local library. Every forward makes the same calls in the same
order; one that stops part-way (an error between layers) is closed with a STOP header
before the next command, so the shared ranks never wait on a call that will not come.
Decode steps run eagerly (no CUDA graphs: each layer talks to other processes).

A library reaches the shared ranks as tensor parallelism's do (tp_library.py): on a
request's acquire rank 0 sends LOAD_LIBRARY and every shared rank reads its chunks of that
build from the store; rank 0 keeps the routing index but drops its copy of the KV. Refused
with a clear error: libraries held only in memory, FP8 libraries, tiers (config), several
libraries in one request and routing coverage reports (engine). Under torchrun every
process runs the same line: rank 0 this engine, the others `serve_torchrun_rank`.
"""

from __future__ import annotations

from typing import Any

import torch

from moska.config import EngineConfig
from moska.distributed.control_message import Command
from moska.distributed.errors import TensorParallelConfigError
from moska.distributed.partition import ChunkPlacement
from moska.distributed.runtime import DistributedRuntime, torchrun_rank
from moska.distributed.shared_kv import SharedKVClient, SharedKVLayout, SharedKVSpec
from moska.distributed.shared_kv_replicas import ChunkReads, RankLoads
from moska.distributed.step_channel import StepChannel
from moska.distributed.tp_library import TensorParallelLibraries
from moska.kernels.selections import Selections
from moska.library.loaded import LoadedLibrary
from moska.library.manager import LibraryManager

# forwards of a library build between two re-placements of its hot-chunk replicas
# (shared_kv_replica_slots > 0), as EPLB re-balances experts every so many steps
REPLICA_WINDOW = 16


class SharedKVConfigError(TensorParallelConfigError):
    """A library or launch that shared-KV ranks cannot serve (yet); the message says what to
    do instead."""


def start_shared_kv(config: EngineConfig, path, dtype, device: str):
    """(LoadedModel, DistributedRuntime, SharedKVLibraries): load the model here, then start
    the `config.shared_kv_ranks` shared ranks."""
    from moska.distributed.shared_kv_rank import run_shared_rank
    from moska.library.manager import default_library_root
    from moska.model import load_model

    rank = torchrun_rank()
    if rank is not None and rank != 0:  # torchrun started this shared rank: serve rank 0
        from moska.distributed.tp_shared_kv import serve_torchrun_rank

        serve_torchrun_rank(config, path, dtype, device)
        raise SystemExit(0)
    if config.tier_config is not None:
        raise SharedKVConfigError(
            "shared_kv_ranks holds each library's chunks on the shared ranks, not in tiers; "
            "leave library_gpu_budget unset"
        )
    loaded = load_model(path, dtype=dtype, device=device)
    param = next(loaded.model.parameters())
    name = str(param.dtype).removeprefix("torch.")
    m = config.shared_kv_ranks
    runtime = DistributedRuntime.start(
        1 + m, device, (str(path), name, device, config), target=run_shared_rank
    )
    try:
        mc = loaded.config
        channel = SharedKVChannel(
            runtime.groups.comm, runtime.groups.control, param.device, mc.hidden_size, param.dtype
        )
        runtime.channel = channel
        spec = SharedKVSpec(mc.num_heads, mc.num_kv_heads, mc.head_dim, param.dtype, mc.sm_scale)
        remote = SharedKVAttention(spec, SharedKVLayout(1, m), channel, mc.num_layers)
        remote.replica_slots = config.shared_kv_replica_slots
        channel.before_command = remote.flush
        root = config.library_root or default_library_root()
        libraries = SharedKVLibraries(root, loaded, param.device, channel, remote)
    except BaseException:
        runtime.shutdown()
        raise
    return loaded, runtime, libraries


class SharedKVChannel(StepChannel):
    """The step channel of an engine with shared ranks: a forward left part-way is closed
    (``before_command``) before any command goes out."""

    before_command: Any = None

    def _header(self, command: Command, *fields: int) -> None:
        if self.before_command is not None:
            self.before_command()
        super()._header(command, *fields)

    def send_shared_step(self, builds: list[str], calls: int) -> None:
        with self._lock:
            self._json_header(Command.SHARED_STEP, {"builds": builds, "calls": calls})


class SharedKVAttention:
    """A unique rank's side of the library attention (`PagedAttention.shared_kv`): rank 0's
    (`channel` set: it tells the shared ranks what each forward asks), or under tensor
    parallelism another TP rank's (`channel` None; rank 0's FORWARD told them). `spec`: this
    rank's heads; `kv_offset`: the global index of its first KV head."""

    def __init__(
        self,
        spec: SharedKVSpec,
        layout: SharedKVLayout,
        channel: SharedKVChannel | None,
        layers: int,
        kv_offset: int = 0,
    ) -> None:
        self.spec, self.layout, self.channel, self.layers = spec, layout, channel, layers
        self.kv_offset = kv_offset
        # one unique rank: SHARED_STEP announces a forward; with tensor parallelism rank 0's
        # FORWARD does (its library groups), which every rank receives
        self.announce = channel is not None and layout.num_unique == 1
        self.clients: dict[str, SharedKVClient] = {}  # build id -> client
        self.remaining = 0  # attention calls of the current forward not made yet
        self.calls = 0  # attend calls made (all forwards)
        self.loads = RankLoads(layout.num_shared)  # per-shared-rank load per forward
        self.reads = ChunkReads()  # readers per chunk, for hot-chunk replicas
        self.replica_slots = 0  # > 0: re-place every REPLICA_WINDOW forwards of a build
        self.replan: Any = None  # SharedKVLibraries.replicate_hot_chunks(build id)

    def add(self, library: LoadedLibrary, ops: Any) -> None:
        placement = ChunkPlacement.by_chunk_id(library.num_chunks, self.layout.num_shared)
        self.clients[library.build_id] = SharedKVClient(
            self.spec, self.layout, placement, ops, kv_offset=self.kv_offset
        )

    def begin(self, groups: list) -> None:
        """A forward over `groups` starts: tell the shared ranks what it will ask."""
        builds = [g.library.build_id for g in groups]
        missing = [g.library.name for g in groups if g.library.build_id not in self.clients]
        if missing:
            raise SharedKVConfigError(
                f"library {missing[0]!r} was not acquired through the engine's library "
                "manager, so the shared-KV ranks do not hold it; request it by name"
            )
        if any(g.coverage_layers for g in groups):
            raise SharedKVConfigError("routing coverage does not run with shared-KV ranks")
        self.flush()  # a forward left part-way, before any other command
        if self.channel is not None and self.replica_slots and self.replan is not None:
            for build in dict.fromkeys(builds):
                if self.reads.forward(build) % REPLICA_WINDOW == 0:
                    self.replan(build)
        calls = self.layers * len(groups)
        if self.announce:
            assert self.channel is not None
            self.channel.send_shared_step(builds, calls)
        self.loads.start_forward()
        self.remaining = calls

    def flush(self) -> None:
        """End a forward that stopped before its last attention call (a STOP header)."""
        if self.remaining > 0:
            self.remaining = 0
            if self.layout.num_unique > 1:  # the other TP ranks are inside that forward
                raise RuntimeError(
                    "a forward with tensor parallelism and shared-KV ranks stopped between "
                    "its layers on rank 0: the ranks no longer agree; restart the engine"
                )
            next(iter(self.clients.values())).stop()

    def group_states(self, ops, layer: int, q_rows: torch.Tensor, group, sm_scale: float,
                     keymax_programs: int | None = None):  # fmt: skip
        """(o [n*Hkv, G, D], lse [n*Hkv, G], per-row selections, routed selections): the
        group's library state of every (row, KV head), attended on the shared ranks."""
        from moska.attention.shared import route_group

        if self.remaining <= 0:
            raise SharedKVConfigError(
                "a library forward must go through PagedAttention.bind (it tells the "
                "shared-KV ranks what follows)"
            )
        sel = route_group(ops, layer, q_rows, group, sm_scale, keymax_programs)
        n, hq, d = q_rows.shape
        hkv, g, dev = self.spec.num_kv_heads, self.spec.group_size, q_rows.device
        o0 = torch.zeros(n, hq, d, dtype=q_rows.dtype, device=dev)
        lse0 = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=dev)
        self.remaining -= 1
        self.calls += 1
        client = self.clients[group.library.build_id]
        if self.channel is not None:  # rank 0 plans the replicas (from its heads' reads)
            self.reads.add(group.library.build_id, sel.chunk, client.placement.num_chunks)
        o, lse = client.attend(layer, q_rows.contiguous(), o0, lse0, sel)
        self.loads.add_call(*client.last_loads)
        rows = Selections(
            req=torch.arange(n, device=dev).repeat_interleave(hkv).to(torch.int32),
            kv_head=torch.arange(hkv, device=dev).repeat(n).to(torch.int32),
            chunk=torch.zeros(n * hkv, dtype=torch.int32, device=dev),  # unused by the merge
        )
        return o.reshape(n * hkv, g, d), lse.reshape(n * hkv, g), rows, sel


class SharedKVLibraries(TensorParallelLibraries):
    """Rank 0's LibraryManager with shared ranks: loads and unloads reach them as under
    tensor parallelism (LOAD_LIBRARY on acquire, UNLOAD once unread); rank 0 keeps each
    library's routing index and drops its KV; builds run here (rank 0 holds the model)."""

    def __init__(self, root, loaded_model, device, channel, remote: SharedKVAttention) -> None:
        LibraryManager.__init__(self, root, loaded_model, device, arena=None)  # KV on shared ranks
        self.channel = channel
        self.split = None  # whole KV heads: nothing split
        self.shared_kv = remote
        self.load_options = {}
        from moska.kernel_ops import kernel_ops

        self._ops = kernel_ops("auto", device)  # the clients' merge (rank 0's runner agrees)
        remote.replan = self._replan

    def replicate_hot_chunks(self, name: str, slots_per_rank: int) -> ChunkPlacement:
        """Re-place `name`'s chunks: chunk c on shared rank c % M plus up to
        `slots_per_rank` copies per rank of the chunks read most since the last placement
        (`ChunkPlacement.with_replicas`); the shared ranks load what they now hold. Call
        from the engine's thread, between steps. Returns the placement in force."""
        library = self.get(name)
        remote, build = self.shared_kv, library.build_id
        client = remote.clients[build]
        c, m = library.num_chunks, remote.layout.num_shared
        load = remote.reads.load(build, c)
        placement = ChunkPlacement.by_chunk_id(c, m).with_replicas(load, slots_per_rank)
        remote.reads.drop(build)  # the next window counts afresh
        if placement != client.placement:
            holders = [list(h) for h in placement.holders]
            self.channel.send_place_library(str(self.root), name, build, holders)
            client.placement = placement
        return client.placement

    def _replan(self, build_id: str) -> None:
        """The automatic re-placement at the end of each REPLICA_WINDOW (engine thread)."""
        names = [n for n, lib in self._loaded.items() if lib.build_id == build_id]
        if names:  # a build no longer loaded under a name keeps its placement
            forwards = self.shared_kv.reads.forwards.get(build_id, 0)
            self.replicate_hot_chunks(names[0], self.shared_kv.replica_slots)
            self.shared_kv.reads.forwards[build_id] = forwards

    def reserve(self, name: str) -> Any:
        return LibraryManager.reserve(self, name)

    def build(self, name: str, *args: Any, **kwargs: Any):
        return LibraryManager.build(self, name, *args, **kwargs)

    def _register(self, name: str, library: LoadedLibrary) -> None:
        if not library.manifest.files:
            raise SharedKVConfigError(
                f"library {name!r} exists only in this process's memory; with shared-KV "
                "ranks every library is read from the store: save it under the library root "
                "and request it again, or serve with shared_kv_ranks=0"
            )
        if library.kv_scale_pools is not None or library.tiers is not None:
            raise SharedKVConfigError(
                f"library {name!r} is FP8 or in tiers, which shared-KV ranks do not serve "
                "yet: build it with the model's dtype, or serve with shared_kv_ranks=0"
            )
        # the KV lives on the shared ranks: keep the shapes (routing reads them), no storage
        for pools in (library.k_pools, library.v_pools):
            for i, t in enumerate(pools):
                pools[i] = t.new_zeros(()).expand(t.shape)
        self.shared_kv.add(library, self._ops)
        LibraryManager._register(self, name, library)
