"""A shared-KV rank of an engine (`shared_kv_ranks=M`): a process that holds no model
weights, only its partition of each library's chunks, and serves the attention over them.

Rank 0 (the engine, the only unique rank) spawns it (distributed/runtime.py) and drives it
over the step channel's control group: LOAD_LIBRARY (read this rank's chunks of a build from
the store: `ChunkPlacement.by_chunk_id`, chunk c on shared rank c % M; only those rows of
each layer file are read), PLACE_LIBRARY (a build's new placement, hot chunks replicated:
the chunks this rank now holds are read again), UNLOAD_LIBRARY, SHARED_STEP (the builds of one forward's library
groups, in order, and how many attention calls the forward makes) and STOP. During a
SHARED_STEP it serves `SharedKVServer.serve_layer` once per call, the groups in turn, or
until rank 0 sends a STOP header (a forward rank 0 abandoned part-way).

Beside tensor parallelism (`tensor_parallel_size=N`, distributed/tp_shared_kv.py) the N
TP ranks are the unique ranks and every command reaches every rank: a FORWARD naming
library groups stands for SHARED_STEP (the shared ranks are outside the model's group and
take only its JSON); the rest of the forward's traffic is not theirs.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import torch

from moska.distributed.control_message import Command
from moska.distributed.partition import ChunkPlacement
from moska.distributed.rank_processes import ParentLink
from moska.distributed.runtime import ProcessGroups, Rendezvous
from moska.distributed.shared_kv import (
    STOP,
    LibraryShard,
    SharedKVLayout,
    SharedKVServer,
    SharedKVSpec,
)
from moska.distributed.step_channel import StepChannel
from moska.distributed.worker import join_spawned, rank_lifecycle

logger = logging.getLogger(__name__)


def run_shared_rank(
    rdv: Rendezvous, rank: int, parent: ParentLink, model_path, dtype, device, config
):
    """Entry point of a spawned shared-KV rank: `dtype` is the engine's resolved model dtype."""
    groups, dev = join_spawned(rdv, rank, device)
    with rank_lifecycle(groups, parent):
        serve_shared(groups, model_path, getattr(torch, dtype), dev, config)


def serve_shared(groups: ProcessGroups, model_path, dtype: torch.dtype, device, config) -> None:
    """Run rank 0's commands until STOP."""
    from moska.distributed.tp_shared_kv import engine_layout
    from moska.kernel_ops import kernel_ops
    from moska.model.config import ModelConfig

    mcfg = ModelConfig.from_file(Path(model_path) / "config.json")
    ops = kernel_ops(config.attention, device)
    n = config.tensor_parallel_size  # the unique ranks
    layout = engine_layout(mcfg, n, groups.world_size - n)
    comm = groups.comm if n == 1 else None  # not in the TP ranks' model group
    channel = StepChannel(comm, groups.control, device, mcfg.hidden_size, dtype)
    servers: dict[str, SharedKVServer] = {}  # build id -> this rank's server of its chunks
    while True:
        msg = channel.recv()
        info = msg.info or {}
        if msg.command is Command.STOP:
            return
        if msg.command is Command.LOAD_LIBRARY:
            error = None
            if info["build"] not in servers:
                try:
                    shard, scale = load_shard(
                        info["root"], info["name"], info["build"], layout, groups.rank, device
                    )
                    spec = SharedKVSpec(
                        mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, dtype,
                        mcfg.sm_scale * scale,
                    )  # fmt: skip
                    servers[info["build"]] = SharedKVServer(spec, layout, shard, ops)
                except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
                    logger.warning("loading library %s failed: %s", info["name"], e)
                    error = f"{type(e).__name__}: {e}"
            channel.answer_load(error)
        elif msg.command is Command.UNLOAD_LIBRARY:
            servers.pop(info["build"], None)
        elif msg.command is Command.PLACE_LIBRARY:  # hot-chunk replicas: a new placement
            error = None
            try:
                holders = tuple(tuple(h) for h in info["holders"])
                placement = ChunkPlacement(len(holders), layout.num_shared, holders)
                shard, _ = load_shard(
                    info["root"], info["name"], info["build"], layout, groups.rank, device,
                    placement,
                )  # fmt: skip
                old = servers[info["build"]]  # its spec (sm_scale included) stays
                servers[info["build"]] = SharedKVServer(old.spec, layout, shard, ops)
            except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
                logger.warning("placing library %s failed: %s", info["name"], e)
                error = f"{type(e).__name__}: {e}"
            channel.answer_load(error)
        elif msg.command is Command.SHARED_STEP:
            serve_step([servers[b] for b in info["builds"]], info["calls"])
        elif msg.command is Command.FORWARD and msg.groups:  # tensor parallelism: announced
            builds = [g["build"] for g, _ in msg.groups]
            serve_step([servers[b] for b in builds], mcfg.num_layers * len(builds))


@torch.inference_mode()
def serve_step(servers: list[SharedKVServer], calls: int) -> None:
    """One forward: each layer's attention calls the groups in order, so call i serves
    group i mod len(groups); a STOP header ends the forward early."""
    for i in range(calls):
        if servers[i % len(servers)].serve_layer() == STOP:
            return


def load_shard(
    root: str,
    name: str,
    build_id: str,
    layout: SharedKVLayout,
    rank: int,
    device,
    placement: ChunkPlacement | None = None,
) -> tuple[LibraryShard, float]:
    """(this rank's chunks of every layer, the library's factor on sm_scale), reading only
    those rows of the store's layer files; `placement` None: chunk c on shared rank c % M."""
    from safetensors import safe_open

    from moska.library.format import layer_file, library_files, read_manifest, validate_name
    from moska.library.loaded import LoadedLibrary
    from moska.library.positions import shared_logit_adjustment

    directory = Path(root) / validate_name(name)
    manifest = read_manifest(directory)
    library_files(directory, manifest)  # every file inside the folder, present
    holder = types.SimpleNamespace(manifest=manifest)  # what the two helpers read
    found = LoadedLibrary.build_id.fget(holder)  # type: ignore[attr-defined]
    if found != build_id:
        raise RuntimeError(
            f"the store holds build {found} of {name!r}, rank 0 loaded {build_id} (rebuilt "
            "meanwhile): request it again"
        )
    if manifest.kv_dtype == "fp8":
        raise RuntimeError("FP8 libraries are not served by shared-KV ranks yet")
    offs = list(manifest.chunk_offsets)
    if placement is None:
        placement = ChunkPlacement.by_chunk_id(manifest.num_chunks, layout.num_shared)
    chunks = placement.chunks_of(layout.shared_index(rank))
    m = manifest.model
    k_pools: list[torch.Tensor] = []
    v_pools: list[torch.Tensor] = []
    for i in range(manifest.num_kv_layers):
        with safe_open(str(directory / layer_file(i)), framework="pt", device=str(device)) as f:
            for key, pools in (("k", k_pools), ("v", v_pools)):
                part = f.get_slice(key)
                rows = [part[offs[c] : offs[c + 1]] for c in chunks]
                empty = torch.zeros(0, m.num_kv_heads, m.head_dim, dtype=getattr(torch, m.dtype))
                pools.append(torch.cat(rows).contiguous() if rows else empty.to(device))
    lens = [offs[c + 1] - offs[c] for c in chunks]
    local_offs = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(device, torch.int32)
    local = torch.full((placement.num_chunks,), -1, dtype=torch.int64, device=device)
    local[list(chunks)] = torch.arange(len(chunks), device=device)
    scale, _ = shared_logit_adjustment(holder)  # its log-scale bias is applied on rank 0
    return LibraryShard(tuple(chunks), k_pools, v_pools, local_offs, local), scale
