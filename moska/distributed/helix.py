"""Helix: KV-parallel attention, then an all-to-all back to tensor parallelism for the FFN.

N ranks. During attention they are KVP x TPA: the KV of every request is sharded by
blocks over the KVP ranks of a group (global block g on KVP rank g % KVP, as in
`kv_parallel_step.py`), and the KV heads over the TPA groups (each group holds Hkv / TPA KV
heads and their query heads, replicated over its KVP ranks). Rank r is KVP rank r % KVP of
TPA group r // KVP. Per layer a rank

1. projects q (its group's Hq / TPA heads) and k, v (its group's KV heads) from the whole
   hidden state (every rank has it after the previous all-reduce);
2. writes the new tokens whose block it holds and attends its query heads over its shard:
   a partial (o [T, Hq/TPA, D], lse [T, Hq/TPA]);
3. exchanges partials in one all-to-all inside its KVP group, by query heads: KVP rank j
   receives head slice j of every shard's partial, so rank r holds heads r*Hq/N ..
   (r+1)*Hq/N of every row from every shard, and merges them by LSE (exact);
4. applies its o_proj columns (those heads: row-parallel over all N ranks) and the
   all-reduce; the FFN, the vocab-parallel embedding and LM head are tensor-parallel over
   N exactly as in `tensor_parallel.py`.

HOP-B (`microbatches` > 1): the rows are cut into micro-batches; the all-to-all of one is in
flight (async) while the next one's partial is computed. o and lse travel packed in one
byte buffer, so a micro-batch costs one collective, not two.

Compared with DistAttention (`kv_parallel_step.py`: every rank the whole model, partials
all-gathered) the weights are split N ways and each rank receives (KVP - 1) / N of the
partials instead of (KVP - 1) of them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moska.attention.backend import PagedAttention
from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata
from moska.attention.routing_report import GroupRouting
from moska.distributed.comm import Collectives
from moska.distributed.helix_library import HelixHeadSplit, head_split, library_state
from moska.distributed.kv_parallel import merge_partials
from moska.distributed.kv_parallel_step import KVParallelConfigError, LocalStep, local_step
from moska.distributed.tensor_parallel import (
    RowParallelLinear,
    ShardPlan,
    TensorParallelCausalLM,
    TensorSlice,
    span,
)
from moska.kernel_ops import KernelOps
from moska.model.config import ModelConfig


class HelixConfigError(KVParallelConfigError):
    """A Helix layout this model or engine cannot run; the message says what to do."""


@dataclass(frozen=True)
class HelixLayout:
    """`world` ranks, KV sharded over `kvp` of them (KVP), heads over world / kvp (TPA)."""

    world: int
    kvp: int

    def __post_init__(self) -> None:
        if self.kvp < 2:
            raise HelixConfigError(
                f"Helix needs decode_context_parallel_size >= 2 (got {self.kvp}): it is the "
                "number of ranks a request's KV is sharded over"
            )
        if self.world % self.kvp:
            raise HelixConfigError(
                f"Helix needs tensor_parallel_size ({self.world}) to be a multiple of "
                f"decode_context_parallel_size ({self.kvp}); or leave tensor_parallel_size "
                "at 1: then the ranks are the KVP ones"
            )

    @classmethod
    def from_engine(cls, config: Any) -> HelixLayout:
        """From EngineConfig: N = tensor_parallel_size (or decode_context_parallel_size
        when that is 1), KVP = decode_context_parallel_size."""
        kvp, tp = config.decode_context_parallel_size, config.tensor_parallel_size
        return cls(tp if tp > 1 else kvp, kvp)

    @property
    def tpa(self) -> int:
        return self.world // self.kvp

    def kvp_rank(self, rank: int) -> int:
        return rank % self.kvp

    def tpa_index(self, rank: int) -> int:
        return rank // self.kvp

    def kvp_groups(self) -> list[list[int]]:
        """The ranks of each KVP group (the all-to-all's), by TPA index."""
        return [list(range(a * self.kvp, (a + 1) * self.kvp)) for a in range(self.tpa)]

    def cross_groups(self) -> list[list[int]]:
        """The ranks of each KVP rank, one per TPA group (library routing's), by KVP rank."""
        return [list(range(j, self.world, self.kvp)) for j in range(self.kvp)]

    def check(self, config: ModelConfig) -> None:
        """Raises HelixConfigError when the model's heads do not split this way."""
        hq, hkv = config.num_heads, config.num_kv_heads
        if hkv % self.tpa or hq % self.world:
            raise HelixConfigError(
                f"Helix with {self.world} ranks (KVP {self.kvp} x TPA {self.tpa}) needs the "
                f"KV heads ({hkv}) divisible by TPA and the query heads ({hq}) by the ranks; "
                "pick a tensor_parallel_size / decode_context_parallel_size that divide them"
            )

    def o_heads(self, config: ModelConfig, rank: int) -> tuple[int, int]:
        """The query heads rank `rank` holds after the all-to-all (its o_proj columns)."""
        n = config.num_heads // self.world
        return rank * n, (rank + 1) * n

    def plan(self, config: ModelConfig, rank: int) -> ShardPlan:
        """Rank `rank`'s slice: its TPA group's heads for q/k/v and the KV cache; the
        intermediate features and vocabulary split over all N ranks."""
        self.check(config)
        heads = ShardPlan.build(config, self.tpa_index(rank), self.tpa)
        return ShardPlan(
            rank,
            self.world,
            heads.q_heads,
            heads.kv_heads,
            span(config.intermediate_size, self.world, rank),
            span(config.vocab_size, self.world, rank),
            -(-config.vocab_size // self.world),
        )

    def tensor_slices(self, config: ModelConfig, rank: int) -> dict[str, TensorSlice]:
        """The TP slices of `plan`, but o_proj's columns are the rank's post-exchange heads."""
        out = self.plan(config, rank).tensor_slices(config)
        d = config.head_dim
        lo, hi = self.o_heads(config, rank)
        o = TensorSlice(1, lo * d, hi * d, config.q_size)
        for i in range(config.num_layers):
            out[f"model.layers.{i}.self_attn.o_proj.weight"] = o
        return out


def _pack(o: torch.Tensor, lse: torch.Tensor, p: int) -> torch.Tensor:
    """[P, rows * (hs*D*es + hs*4)] uint8: head slice j of (o, lse) in row j."""
    t, hq, d = o.shape
    hs = hq // p
    ob = o.reshape(t, p, hs * d).transpose(0, 1).contiguous().view(torch.uint8)  # [P, T, .]
    lb = lse.float().reshape(t, p, hs).transpose(0, 1).contiguous().view(torch.uint8)
    return torch.cat([ob, lb], dim=2).reshape(p, -1)


def _unpack(buf: torch.Tensor, t: int, hs: int, d: int, dtype: torch.dtype):
    """Inverse of `_pack` on the received buffer: (o [P, T, hs, D], lse [P, T, hs])."""
    p = buf.shape[0]
    es = torch.empty((), dtype=dtype).element_size()
    rows = buf.view(p, t, -1)
    o = rows[:, :, : hs * d * es].contiguous().view(dtype).view(p, t, hs, d)
    lse = rows[:, :, hs * d * es :].contiguous().view(torch.float32).view(p, t, hs)
    return o, lse


def helix_exchange(
    q: torch.Tensor,  # [T, Hq_tpa, D] this rank's query heads (its TPA group's)
    k_cache: torch.Tensor,  # this rank's KV shard, [blocks, block_size, Hkv_tpa, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [T, L] int32, local blocks per row (logical order)
    visible: torch.Tensor,  # [T] int32, local tokens each row sees
    sm_scale: float,
    ops: KernelOps,
    group: Any,
    microbatches: int = 1,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,  # (o, lse) [T, ...]: libraries
) -> torch.Tensor:  # [T, Hq_tpa / KVP, D]: this rank's head slice, merged over all shards
    """Partial attention over this rank's shard, one all-to-all per micro-batch inside
    the KVP `group`, LSE merge. With `microbatches` > 1 (HOP-B) micro-batch i's
    all-to-all runs while micro-batch i+1 is attended; the result is the same. `extra`:
    this rank's part of the library attention (helix_library.py), merged in before the
    exchange."""
    p = dist.get_world_size(group)
    t, hq, d = q.shape
    hs = hq // p
    host = q.is_cuda and dist.get_backend(group) == "gloo"  # ranks sharing a GPU: a logic run
    bounds = torch.linspace(0, t, max(1, min(microbatches, t)) + 1).round().long().tolist()
    pending = []
    for a, b in itertools.pairwise(bounds):
        o, lse = ops.paged_decode(
            q[a:b], k_cache, v_cache, block_tables[a:b], visible[a:b], sm_scale
        )
        if extra is not None:
            o, lse = merge_partials(
                torch.stack([o, extra[0][a:b].to(o.dtype)]), torch.stack([lse, extra[1][a:b]])
            )
        send = _pack(o, lse, p)
        send = send.cpu() if host else send
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=group, async_op=True)
        pending.append((work, recv, b - a, o.dtype))
    outs = []
    for work, recv, rows, dtype in pending:
        work.wait()
        o_parts, lse_parts = _unpack(recv.to(q.device), rows, hs, d, dtype)
        outs.append(merge_partials(o_parts, lse_parts)[0])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class HelixAttention(PagedAttention):
    """`PagedAttention` over this rank's KV shard and KV heads (`bind` per step)."""

    def __init__(
        self,
        cache: PagedKVCache,
        ops: KernelOps,
        sm_scale: float,
        layout: HelixLayout,
        rank: int,
        group: Any,
        microbatches: int = 1,
    ) -> None:
        super().__init__(cache, ops, sm_scale)
        self.layout, self.rank, self.group = layout, rank, group
        self.microbatches = microbatches
        self.exchanges = 0  # all-to-all layers run (for tests and metrics)

    def bind(self, meta: AttentionMetadata) -> HelixBound:  # type: ignore[override]
        lay = self.layout
        step = local_step(meta, lay.kvp_rank(self.rank), lay.kvp, self.cache.block_size)
        return HelixBound(self, meta, step)


class HelixBound:
    """The `attn(layer, q, k, v) -> o [T, Hq/N, D]` callable of one step."""

    def __init__(self, parent: HelixAttention, meta: AttentionMetadata, step: LocalStep):
        self.p, self.meta, self.step = parent, meta, step
        self.routing = [GroupRouting() for _ in meta.groups]  # read by the runner

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq/TPA, D]
        k: torch.Tensor | None,  # [T, Hkv/TPA, D]; None: an MLKV layer reading its source's
        v: torch.Tensor | None,
    ) -> torch.Tensor:
        p, s = self.p, self.step
        s.write_kv(p.cache, layer, k, v, p.ops.kv_write)
        kc, vc = p.cache.k[layer], p.cache.v[layer]
        lay, extra = p.layout, None
        if self.meta.groups:  # this rank's part of the libraries' selections
            extra = library_state(
                p.ops, layer, q, self.meta.groups, self.routing, p.sm_scale,
                lay.kvp_rank(p.rank), lay.kvp,
            )  # fmt: skip
        o = helix_exchange(
            q, kc, vc, s.block_tables, s.visible, p.sm_scale, p.ops, p.group, p.microbatches,
            extra,
        )  # fmt: skip
        p.exchanges += 1
        return o.to(q.dtype)


class HelixCausalLM(TensorParallelCausalLM):
    """One rank's slice under Helix: TP's model (vocab-parallel embedding and LM head,
    column-parallel q/k/v and gate/up over its slice, row-parallel down), with o_proj over
    the rank's post-exchange heads. `kv_parallel` gives the runner the attention and the
    global block count."""

    def __init__(
        self, config: ModelConfig, plan: ShardPlan, helix: HelixModel, *, dtype=None, device=None
    ) -> None:
        super().__init__(config, plan, helix.comm, dtype=dtype, device=device)
        self.kv_parallel = helix
        lo, hi = helix.layout.o_heads(config, plan.rank)
        kw = {"dtype": dtype, "device": device}
        for layer in self.decoder_layers:
            layer.self_attn.o_proj = RowParallelLinear(
                (hi - lo) * config.head_dim, config.hidden_size, config.o_bias, helix.comm, **kw
            )


class HelixModel:
    """The `load_model(..., tensor_parallel=)` hook of a Helix rank, and what the runner
    asks of it. Creating it creates the KVP groups: every rank must, in the same order."""

    def __init__(self, comm: Collectives, layout: HelixLayout, microbatches: int = 1) -> None:
        if comm.world_size != layout.world:
            raise HelixConfigError(f"{comm.world_size} ranks joined, the layout has {layout}")
        self.comm, self.layout, self.microbatches = comm, layout, microbatches
        groups = [dist.new_group(ranks) for ranks in layout.kvp_groups()]
        self.group = groups[layout.tpa_index(comm.rank)]
        # one rank per TPA group (this KVP rank's): library routing exchanges scores there
        a, tpa = layout.tpa_index(comm.rank), layout.tpa
        cross = [dist.new_group(ranks) for ranks in layout.cross_groups()] if tpa > 1 else []
        self.cross = Collectives(
            cross[layout.kvp_rank(comm.rank)] if cross else None, a, tpa, comm.backend
        )

    def make_model(self, config: ModelConfig, *, dtype, device) -> HelixCausalLM:
        plan = self.layout.plan(config, self.comm.rank)
        return HelixCausalLM(config, plan, self, dtype=dtype, device=device)

    def tensor_slices(self, config: ModelConfig) -> dict[str, TensorSlice]:
        return self.layout.tensor_slices(config, self.comm.rank)

    def head_split(self, model: Any) -> HelixHeadSplit:
        """How the rank's libraries route (its KV heads, scores exchanged over `cross`)."""
        return head_split(model, self.cross)

    def global_blocks(self, local_blocks: int) -> int:
        """Blocks rank 0's block manager allocates from: a KVP group's (TPA groups hold
        the same blocks, other heads)."""
        return local_blocks * self.layout.kvp

    def attention(self, cache: PagedKVCache, ops: KernelOps, sm_scale: float) -> HelixAttention:
        return HelixAttention(
            cache, ops, sm_scale, self.layout, self.comm.rank, self.group, self.microbatches
        )
