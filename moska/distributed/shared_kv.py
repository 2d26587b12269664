"""Shared-KV ranks (MoSKA disaggregation): a library's chunks live on M shared ranks that
hold no model weights; U unique ranks run the model, their own paged KV and the router.

Per layer, in one process group whose ranks 0..U-1 are unique and U..U+M-1 shared:

1. each unique rank routes its rows (the existing router) and finds the holder of every
   selected chunk (``partition.destinations``);
2. header all-to-all: per destination (query rows, selections, layer) — sizes first, as an
   expert-parallel dispatch exchanges token counts before the tokens;
3. query all-to-all: each (request, shared rank) pair's query row [Hq, D], once, however
   many of the request's chunks that rank holds; selection all-to-all: (row, KV head,
   chunk id) int32 per selection. Under tensor parallelism (``SharedKVLayout.q_heads``) a
   unique rank sends only its query heads' part of the row and names its KV heads by their
   global index; the shared rank places each sender's heads into one [rows, Hq, D] batch;
4. each shared rank runs ONE grouped launch over all its chunks for the rows of every
   unique rank, then merges, per row and KV head, the partial states of its own chunks by
   LSE (exact, associative), so it returns one state per row and not one per selection;
5. return all-to-alls of o [rows, Hq, D] (query dtype) and lse [rows, Hq] fp32 (a tensor-
   parallel sender gets back its heads only); each unique rank merges them into its
   unique part with ``merge_selections`` (exact).

A shared rank learns the layer from the header, so it runs ``serve_forever`` until a
unique rank's ``stop``. Every unique rank calls ``attend`` (zero rows allowed) for the same
layers in the same order; collectives time out with the process group's ``timeout``.
One library per client/server pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from moska.distributed.partition import ChunkPlacement, destinations
from moska.kernel_ops import KernelOps
from moska.kernels.selections import Selections

STOP = -1  # header layer value that ends a shared rank's serve_forever
_HEADER = 3  # header columns: query rows, selections, layer


@dataclass(frozen=True)
class SharedKVLayout:
    """Rank roles inside the process group: ``num_unique`` unique ranks first, then
    ``num_shared`` shared ranks; the two counts are independent (1 + 3, 2 + 2, ...).
    ``q_heads``: per unique rank, the query heads [start, stop) it sends (the unique ranks
    form a tensor-parallel group, each with its heads: ``ShardPlan.q_heads``); empty: every
    unique rank sends all heads (independent unique ranks)."""

    num_unique: int
    num_shared: int
    q_heads: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.num_unique < 1 or self.num_shared < 1:
            raise ValueError(
                f"need at least one unique and one shared rank, got {self.num_unique} + "
                f"{self.num_shared}"
            )
        if self.q_heads and len(self.q_heads) != self.num_unique:
            raise ValueError(
                f"q_heads names {len(self.q_heads)} unique ranks, the layout has {self.num_unique}"
            )

    def heads_of(self, rank: int, num_q_heads: int) -> tuple[int, int]:
        """The query heads [start, stop) unique rank ``rank`` sends (of ``num_q_heads``)."""
        return tuple(self.q_heads[rank]) if self.q_heads else (0, num_q_heads)  # type: ignore[return-value]

    @property
    def world_size(self) -> int:
        return self.num_unique + self.num_shared

    def is_shared(self, rank: int) -> bool:
        return rank >= self.num_unique

    def shared_index(self, rank: int) -> int:
        """0..M-1 of a shared rank's group rank."""
        if not self.is_shared(rank):
            raise ValueError(f"rank {rank} is a unique rank, not a shared one")
        return rank - self.num_unique


@dataclass(frozen=True)
class SharedKVSpec:
    """Attention shapes both sides agree on (the receive buffers are sized from them)."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sm_scale: float

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads {self.num_q_heads} must be a multiple of num_kv_heads "
                f"{self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


class LibraryShard(NamedTuple):
    """What one shared rank holds: its chunks' KV of every layer, packed in chunk-id order."""

    chunks: tuple[int, ...]  # global chunk ids held, ascending
    k_pools: list[torch.Tensor]  # per layer [S_local, Hkv, D]
    v_pools: list[torch.Tensor]  # per layer [S_local, Hkv, D]
    chunk_offsets: torch.Tensor  # [C_local + 1] int32
    local_chunk: torch.Tensor  # [C] int64: global id -> local id, -1 when not held


def shard_library(
    k_pools: Sequence[torch.Tensor],  # per layer [S_total, Hkv, D]
    v_pools: Sequence[torch.Tensor],
    chunk_offsets: torch.Tensor,  # [C + 1] int32
    placement: ChunkPlacement,
    shared_index: int,
) -> LibraryShard:
    """Copies the chunks ``placement`` gives shared rank ``shared_index`` out of a whole
    library (each shared rank would load only these rows from disk in a deployment)."""
    offs = chunk_offsets.tolist()
    if len(offs) != placement.num_chunks + 1:
        raise ValueError(
            f"library has {len(offs) - 1} chunks but the placement {placement.num_chunks}"
        )
    chunks = placement.chunks_of(shared_index)
    dev = chunk_offsets.device
    rows = [torch.arange(offs[c], offs[c + 1], device=dev) for c in chunks]
    idx = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=dev)
    lens = [offs[c + 1] - offs[c] for c in chunks]
    local_offs = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(dev, torch.int32)
    local = torch.full((placement.num_chunks,), -1, dtype=torch.int64, device=dev)
    local[list(chunks)] = torch.arange(len(chunks), device=dev)
    return LibraryShard(
        chunks,
        [k.index_select(0, idx) for k in k_pools],
        [v.index_select(0, idx) for v in v_pools],
        local_offs,
        local,
    )


def _all_to_all(
    send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group
) -> torch.Tensor:
    """Variable-size all-to-all along dim 0 (counts in rows). Gloo with CUDA tensors (several
    ranks on one GPU, a logic run) stages through host memory."""
    host = send.is_cuda and dist.get_backend(group) == "gloo"
    buf = send.cpu() if host else send.contiguous()
    out = buf.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(out, buf, recv_counts, send_counts, group=group)
    return out.to(send.device) if host else out


def _exchange_headers(send: torch.Tensor, group) -> torch.Tensor:
    """send [W, _HEADER] int64, row d for destination d -> row s: what source s sends here."""
    return _all_to_all(send, [1] * send.shape[0], [1] * send.shape[0], group)


class SharedKVClient:
    """The unique-rank side: sends routed query rows out, merges the states coming back.
    ``spec``: this rank's heads (a tensor-parallel rank's slice); ``kv_offset``: the global
    index of its first KV head (selections name local KV heads, the shared ranks global)."""

    def __init__(
        self,
        spec: SharedKVSpec,
        layout: SharedKVLayout,
        placement: ChunkPlacement,
        ops: KernelOps,
        group: dist.ProcessGroup | None = None,
        kv_offset: int = 0,
    ) -> None:
        if placement.num_ranks != layout.num_shared:
            raise ValueError(
                f"placement spans {placement.num_ranks} shared ranks, layout has "
                f"{layout.num_shared}"
            )
        self.spec, self.layout, self.placement, self.ops, self.group = (
            spec,
            layout,
            placement,
            ops,
            group,
        )
        self.kv_offset = kv_offset
        self.last_loads: tuple[list[int], list[int]] = ([], [])

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, D] spec.dtype
        o_base: torch.Tensor,  # [B, Hq, D] unique-part state
        lse_base: torch.Tensor,  # [B, Hq] fp32
        sel: Selections,  # routed (req, kv_head, chunk), chunk ids global
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (o [B, Hq, D], lse [B, Hq] fp32)
        """Shared-library attention of this rank's rows, merged into (o_base, lse_base)."""
        s, lay = self.spec, self.layout
        if q.dtype != s.dtype or tuple(q.shape[1:]) != (s.num_q_heads, s.head_dim):
            raise ValueError(
                f"q must be [B, {s.num_q_heads}, {s.head_dim}] {s.dtype}, got "
                f"{tuple(q.shape)} {q.dtype}"
            )
        b, dev = q.shape[0], q.device
        m, u, hkv, g = lay.num_shared, lay.num_unique, s.num_kv_heads, s.group_size
        d = destinations(sel, b, self.placement)
        stride = max(1, b)
        pair_dest, pair_req = d.pairs // stride, d.pairs % stride
        rows_per = torch.bincount(pair_dest, minlength=m)  # [M]
        sels_per = torch.bincount(d.rank, minlength=m)
        first_pair = torch.cumsum(rows_per, 0) - rows_per
        row_local = d.pair_of_sel - first_pair[d.rank]  # row index within its rank's block
        order = torch.argsort(d.rank, stable=True)
        kv_head = sel.kv_head.long() + self.kv_offset  # global: the shared ranks hold all
        meta = torch.stack([row_local, kv_head, sel.chunk.long()], 1)[order]
        header = torch.zeros(lay.world_size, _HEADER, dtype=torch.int64, device=dev)
        header[u:, 0], header[u:, 1], header[u:, 2] = rows_per, sels_per, layer
        _exchange_headers(header, self.group)  # unique ranks receive nothing
        counts = header.tolist()
        q_split, sel_split = [c[0] for c in counts], [c[1] for c in counts]
        self.last_loads = (q_split[u:], sel_split[u:])  # rows, selections per shared rank
        zeros = [0] * lay.world_size
        hq, dd = s.num_q_heads, s.head_dim
        q_elems = [c * hq * dd for c in q_split]  # rows of this rank's heads, flattened
        _all_to_all(q.index_select(0, pair_req).reshape(-1), q_elems, zeros, self.group)
        _all_to_all(meta.to(torch.int32), sel_split, zeros, self.group)
        p = pair_req.numel()
        o_ret = _all_to_all(q.new_empty(0), zeros, q_elems, self.group).view(p, hq, dd)
        lse_ret = _all_to_all(
            torch.empty(0, dtype=torch.float32, device=dev),
            zeros,
            [c * hq for c in q_split],
            self.group,
        ).view(p, hq)
        back = Selections(
            req=pair_req.repeat_interleave(hkv).to(torch.int32),
            kv_head=torch.arange(hkv, device=dev).repeat(p).to(torch.int32),
            chunk=pair_dest.repeat_interleave(hkv).to(torch.int32),  # the rank, for the record
        )
        return self.ops.merge_selections(
            o_base, lse_base, o_ret.view(p * hkv, g, s.head_dim), lse_ret.view(p * hkv, g), back
        )

    def stop(self) -> None:
        """Ends the shared ranks' ``serve_forever`` (call on every unique rank, once)."""
        header = torch.zeros(self.layout.world_size, _HEADER, dtype=torch.int64)
        header[self.layout.num_unique :, 2] = STOP
        _exchange_headers(header.to(self._device()), self.group)

    def _device(self) -> torch.device:
        nccl = dist.get_backend(self.group) == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


class SharedKVServer:
    """The shared-rank side: one grouped launch per layer over its chunks for every
    unique rank's rows. ``spec``: the whole model's heads."""

    def __init__(
        self,
        spec: SharedKVSpec,
        layout: SharedKVLayout,
        shard: LibraryShard,
        ops: KernelOps,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.spec, self.layout, self.shard, self.ops, self.group = spec, layout, shard, ops, group
        self.device = shard.chunk_offsets.device
        self.loads: list[tuple[int, int, int]] = []  # per layer served: (layer, rows, selections)

    def serve_layer(self) -> int:
        """Serves one layer for every unique rank; returns that layer, or STOP."""
        s, lay, dev = self.spec, self.layout, self.device
        w = lay.world_size
        header = _exchange_headers(
            torch.zeros(w, _HEADER, dtype=torch.int64, device=dev), self.group
        )
        senders = header[: lay.num_unique].tolist()
        layers = {c[2] for c in senders}
        if len(layers) != 1:
            raise RuntimeError(f"unique ranks disagree on the layer: {sorted(layers)}")
        layer = layers.pop()
        if layer == STOP:
            return STOP
        rows_from = [c[0] for c in senders] + [0] * lay.num_shared
        sels_from = [c[1] for c in senders] + [0] * lay.num_shared
        zeros = [0] * w
        hq, dd = s.num_q_heads, s.head_dim
        heads = [lay.heads_of(u, hq) for u in range(lay.num_unique)]
        width = [b - a for a, b in heads] + [0] * lay.num_shared
        flat = _all_to_all(
            torch.empty(0, dtype=s.dtype, device=dev),
            zeros,
            [r * h * dd for r, h in zip(rows_from, width)],
            self.group,
        )
        meta = _all_to_all(
            torch.empty(0, _HEADER, dtype=torch.int32, device=dev), zeros, sels_from, self.group
        ).long()  # [N, 3]: row within its sender's block, kv_head (global), global chunk
        q = flat.new_zeros(sum(rows_from), hq, dd)  # each sender's rows, its heads
        parts = flat.split([r * h * dd for r, h in zip(rows_from, width)])
        row = 0
        for (a, b), n, part in zip(heads, rows_from, parts):
            q[row : row + n, a:b] = part.view(n, b - a, dd)
            row += n
        o, lse = self._attend(layer, q, meta, rows_from, sels_from)
        o_back, lse_back, row = [], [], 0
        for (a, b), n in zip(heads, rows_from):  # each sender's rows, its heads only
            o_back.append(o[row : row + n, a:b].reshape(-1))
            lse_back.append(lse[row : row + n, a:b].reshape(-1))
            row += n
        sizes = [r * h for r, h in zip(rows_from, width)]
        _all_to_all(torch.cat(o_back).to(s.dtype), [c * dd for c in sizes], zeros, self.group)
        _all_to_all(torch.cat(lse_back), sizes, zeros, self.group)
        self.loads.append((layer, q.shape[0], meta.shape[0]))
        return layer

    def serve_forever(self) -> int:
        """Serves layers until a STOP header; returns the number of layers served."""
        served = 0
        while self.serve_layer() != STOP:
            served += 1
        return served

    def _attend(self, layer, q, meta, rows_from, sels_from):
        s, sh = self.spec, self.shard
        r, n, dev = q.shape[0], meta.shape[0], q.device
        o = torch.zeros(r, s.num_q_heads, s.head_dim, dtype=s.dtype, device=dev)
        lse = torch.full((r, s.num_q_heads), float("-inf"), dtype=torch.float32, device=dev)
        if n == 0:
            return o, lse
        row_base = torch.tensor(rows_from, device=dev).cumsum(0) - torch.tensor(
            rows_from, device=dev
        )
        sender = torch.repeat_interleave(
            torch.arange(len(sels_from), device=dev), torch.tensor(sels_from, device=dev)
        )
        row = row_base[sender] + meta[:, 0]
        local = sh.local_chunk[meta[:, 2]]
        if bool((local < 0).any()):
            raise RuntimeError("a unique rank sent a chunk this shared rank does not hold")
        key = (local * s.num_kv_heads + meta[:, 1]) * max(1, r) + row
        key, _ = torch.sort(key)
        stride = max(1, r)
        sel = Selections(
            req=(key % stride).to(torch.int32),
            kv_head=((key // stride) % s.num_kv_heads).to(torch.int32),
            chunk=(key // (stride * s.num_kv_heads)).to(torch.int32),
        )
        o_sel, lse_sel = self.ops.grouped_shared(
            q, sh.k_pools[layer], sh.v_pools[layer], sh.chunk_offsets, sel, s.sm_scale
        )
        o, lse = self.ops.merge_selections(o, lse, o_sel, lse_sel, sel)  # per (row, kv_head)
        return o, lse
