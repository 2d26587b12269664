"""One step of an engine whose requests' KV is sharded by blocks over P ranks (decode context
parallelism, `decode_context_parallel_size=P`; DistAttention): how a rank finds its part of
the step, and the attention it runs.

Every rank holds the whole model and a paged KV cache of `n` blocks; rank 0's block manager
allocates from P x n *global* blocks, and global block g lives on rank g % P as its local
block g // P (interleaved at block granularity, as vLLM's DCP interleaves tokens: any
request longer than a block spreads over the ranks, and a request needs at most ~1/P of
its blocks on each). Every rank receives the step as rank 0 built it (global slot mapping
and block tables, `step_channel.py`) and runs the same forward; at each layer it

1. writes only the new tokens whose block it holds, at their local slots;
2. attends each query row to its request's local blocks (kept in logical order, so the keys
   a row may see are a prefix: `visible` tokens; a row with none gives (0, -inf)) — every
   row, decode or prefill, is a decode row of the paged kernel;
3. all-gathers the (o, lse) partials of the P ranks and merges them by LSE
   (`kv_parallel.merge_partials`). The merge is exact, and the same on every rank, so
   every rank carries the same hidden states into the next layer.

Each rank holds the whole model (weights replicated, no tensor parallelism): what is split
is the KV, which is what outgrows one rank for one long request.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from moska.attention.backend import PagedAttention
from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata
from moska.distributed.comm import Collectives
from moska.distributed.errors import TensorParallelConfigError
from moska.distributed.kv_parallel import all_gather_states, merge_partials
from moska.kernel_ops import KernelOps
from moska.model.config import ModelConfig
from moska.model.llama import CausalLM


class KVParallelConfigError(TensorParallelConfigError):
    """A request or setting that decode context parallelism does not serve (yet); the
    message says what to do instead."""


class LocalStep(NamedTuple):
    """Rank r's part of one step (see the module docstring)."""

    write_rows: torch.Tensor  # [n] int64, the step's tokens whose KV this rank stores
    write_slots: torch.Tensor  # [n] int64, their local slots
    block_tables: torch.Tensor  # [T, L] int32, each query row's request's local blocks
    visible: torch.Tensor  # [T] int32, the local tokens each row sees (0: none)

    def write_kv(
        self,
        cache: PagedKVCache,
        layer: int,
        k: torch.Tensor | None,  # [T, Hkv(/TPA), D]; None: an MLKV layer reading its source's
        v: torch.Tensor | None,
        kv_write: Any,  # the engine's KernelOps.kv_write
    ) -> None:
        """Store the step's new K/V rows that this rank holds in its shard of the cache."""
        if k is None:
            return
        assert v is not None
        rows = self.write_rows
        cache.write(layer, k.index_select(0, rows), v.index_select(0, rows), self.write_slots,
                    kv_write)  # fmt: skip


def local_step(meta: AttentionMetadata, rank: int, size: int, block_size: int) -> LocalStep:
    """Rank `rank` of `size`'s writes, block tables and visible lengths for `meta`."""
    dev = meta.block_tables.device
    slots = meta.slot_mapping  # [T] global
    block = torch.div(slots, block_size, rounding_mode="floor")
    mine = (slots >= 0) & (block % size == rank)
    write_rows = mine.nonzero().flatten()
    local_slot = torch.div(block, size, rounding_mode="floor") * block_size + slots % block_size
    write_slots = local_slot.index_select(0, write_rows)

    tables = meta.block_tables.long()  # [B, MB] global
    seq_lens = meta.seq_lens.long()  # [B]
    q_lens = (meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]).long()  # [B]
    b, mb = tables.shape
    j = torch.arange(mb, device=dev)
    used = (
        j[None, :]
        < torch.div(seq_lens + block_size - 1, block_size, rounding_mode="floor")[:, None]
    )
    held = used & (tables % size == rank)  # [B, MB] the request's blocks on this rank
    # this rank's blocks of each request first, in logical order (a stable sort)
    order = torch.sort((~held).to(torch.int8), dim=1, stable=True).indices
    count = held.sum(1)  # [B]
    width = max(1, int(count.max()) if b else 1)
    local = torch.div(tables, size, rounding_mode="floor").gather(1, order)[:, :width]
    local = torch.where(j[None, :width] < count[:, None], local, torch.zeros_like(local))

    row_req = torch.repeat_interleave(torch.arange(b, device=dev), q_lens)  # [T]
    first = meta.cu_q_lens[:-1].long()  # [B]
    row = torch.arange(row_req.numel(), device=dev)
    kv_index = (seq_lens - q_lens)[row_req] + row - first[row_req]  # [T] the row's KV index
    seen = (kv_index[:, None] + 1 - j[None, :] * block_size).clamp(0, block_size)  # [T, MB]
    visible = (seen * held[row_req]).sum(1)
    return LocalStep(
        write_rows, write_slots, local[row_req].to(torch.int32), visible.to(torch.int32)
    )


class KVParallelAttention(PagedAttention):
    """`PagedAttention` over this rank's shard of every request's KV (`bind` per step)."""

    def __init__(
        self,
        cache: PagedKVCache,
        ops: KernelOps,
        sm_scale: float,
        rank: int,
        size: int,
        group: Any = None,
    ) -> None:
        super().__init__(cache, ops, sm_scale)
        self.rank, self.size, self.group = rank, size, group
        self.gathers = 0  # all-gathers made (for tests and metrics)

    def bind(self, meta: AttentionMetadata) -> KVParallelBound:  # type: ignore[override]
        if meta.groups:
            raise KVParallelConfigError(
                "library requests do not run with decode_context_parallel_size > 1 yet; "
                "serve libraries with decode_context_parallel_size=1"
            )
        step = local_step(meta, self.rank, self.size, self.cache.block_size)
        return KVParallelBound(self, meta, step)


class KVParallelBound:
    """The `attn(layer, q, k, v) -> o` callable of one step (the same on every rank)."""

    def __init__(self, parent: KVParallelAttention, meta: AttentionMetadata, step: LocalStep):
        self.p, self.meta, self.step = parent, meta, step

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor | None,  # [T, Hkv, D]; None: an MLKV layer reading its source's KV
        v: torch.Tensor | None,
    ) -> torch.Tensor:  # [T, Hq, D]
        p, s = self.p, self.step
        s.write_kv(p.cache, layer, k, v, p.ops.kv_write)
        kc, vc = p.cache.k[layer], p.cache.v[layer]
        o, lse = p.ops.paged_decode(q, kc, vc, s.block_tables, s.visible, p.sm_scale)
        if p.size > 1:
            o_all, lse_all = all_gather_states(o, lse, p.group)  # [P, T, Hq, D], [P, T, Hq]
            p.gathers += 1
            o, _ = merge_partials(o_all, lse_all)
        return o.to(q.dtype)


class KVParallelCausalLM(CausalLM):
    """The whole model on a rank of a KV-parallel engine. On rank 0 `driver` (a StepChannel)
    sends each engine step's inputs to the other ranks first; logits stay on rank 0."""

    def __init__(self, config: ModelConfig, kv_parallel: KVParallelModel, **kw) -> None:
        super().__init__(config, **kw)
        self.kv_parallel = kv_parallel
        self.driver: Any = None

    def forward(self, input_ids, positions, attn) -> torch.Tensor:
        # an engine step goes to every rank; any other forward (a library build's prefill,
        # over a cache of its own) runs here alone: this rank holds the whole model
        if self.driver is not None and isinstance(attn, KVParallelBound):
            self.driver.send_forward(input_ids, positions, attn)
        return super().forward(input_ids, positions, attn)

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV blocks every rank can hold (the fewest any rank can)."""
        return self.kv_parallel.comm.all_reduce_min(num_blocks)


class KVParallelModel:
    """The `load_model(..., tensor_parallel=)` hook of a KV-parallel rank: the whole model,
    every tensor read whole; and what the runner asks of it (`ModelRunner`)."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm

    @property
    def size(self) -> int:
        return self.comm.world_size

    def make_model(self, config: ModelConfig, *, dtype, device) -> KVParallelCausalLM:
        return KVParallelCausalLM(config, self, dtype=dtype, device=device)

    def tensor_slices(self, config: ModelConfig) -> dict:
        return {}

    def global_blocks(self, local_blocks: int) -> int:
        """Blocks rank 0's block manager allocates from: every rank's."""
        return local_blocks * self.size

    def attention(
        self, cache: PagedKVCache, ops: KernelOps, sm_scale: float
    ) -> KVParallelAttention:
        return KVParallelAttention(cache, ops, sm_scale, self.comm.rank, self.size)
