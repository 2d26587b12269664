"""Tensor parallelism for the Llama family (Megatron layout): which slice of every weight a
rank holds, the two parallel layers that need a collective, and the sharded model.

Per decoder layer: q/k/v and gate/up are column-parallel (a rank computes its heads and its
share of the intermediate features, no communication), o and down are row-parallel (a
partial product, then one all-reduce each): one all-reduce per attention and one per MLP.
The embedding is vocab-parallel (rows outside a rank's range read zero, one all-reduce) and
so is the LM head (each rank's logits for its vocabulary range, gathered on rank 0, which
samples). Norms, RoPE, q/k norms and the o bias are replicated.

Heads are split by KV head so that each rank's KV cache holds only the KV heads its query
heads read. With N <= Hkv ranks the KV heads are split as evenly as possible (sizes differ
by at most one) and each rank takes all query heads of its KV heads; with N > Hkv each KV
head is replicated on the ranks that share it (N / Hkv of them, as evenly as possible) and
its query heads are split among them. The intermediate features and the vocabulary are
split as evenly as possible, so no size needs to divide N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moska.distributed.comm import Collectives
from moska.distributed.errors import TensorParallelConfigError
from moska.model.config import ModelConfig
from moska.model.llama import CausalLM


def span(n: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of part i when n items are split into `parts` contiguous parts whose
    sizes differ by at most one (the first n % parts are one longer)."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


class TensorSlice(NamedTuple):
    """The part of a checkpoint tensor a rank loads: rows or columns [start, stop) of `dim`,
    whose full size is `full`."""

    dim: int
    start: int
    stop: int
    full: int

    @property
    def index(self) -> tuple[slice, ...]:  # type: ignore[override]  # a field, not tuple.index
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `size` holds: [start, stop) ranges of heads, features, vocab."""

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_shard: int  # the longest rank's vocabulary range (logits are padded to it)

    @classmethod
    def build(cls, config: ModelConfig, rank: int, size: int) -> ShardPlan:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in [0, {size})")
        hq, hkv, group = config.num_heads, config.num_kv_heads, config.group_size
        if size > hq:
            raise TensorParallelConfigError(
                f"tensor_parallel_size {size} is more than the model's {hq} attention heads; "
                f"use at most {hq}"
            )
        if size <= hkv:
            kv = span(hkv, size, rank)
            q = (kv[0] * group, kv[1] * group)
        else:  # each KV head is replicated on the ranks that share its query heads
            head = next(h for h in range(hkv) if span(size, hkv, h)[1] > rank)
            first, stop = span(size, hkv, head)
            assert stop - first <= group  # size <= hq spreads at most `group` ranks per head
            lo, hi = span(group, stop - first, rank - first)
            kv = (head, head + 1)
            q = (head * group + lo, head * group + hi)
        inter = span(config.intermediate_size, size, rank)
        vocab = span(config.vocab_size, size, rank)
        shard = -(-config.vocab_size // size)
        return cls(rank, size, q, kv, inter, vocab, shard)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's slice: its heads, features and vocabulary range."""
        return replace(
            config,
            num_heads=self.q_heads[1] - self.q_heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0],
            vocab_size=self.vocab[1] - self.vocab[0],
        )

    def tensor_slices(self, config: ModelConfig) -> dict[str, TensorSlice]:
        """HF tensor name -> the slice this rank loads; tensors not named are loaded whole."""
        d = config.head_dim
        q = TensorSlice(0, self.q_heads[0] * d, self.q_heads[1] * d, config.q_size)
        kv = TensorSlice(0, self.kv_heads[0] * d, self.kv_heads[1] * d, config.kv_size)
        o = TensorSlice(1, q.start, q.stop, config.q_size)
        i0, i1 = self.intermediate
        rows = TensorSlice(0, i0, i1, config.intermediate_size)
        cols = TensorSlice(1, i0, i1, config.intermediate_size)
        vocab = TensorSlice(0, *self.vocab, config.vocab_size)
        out = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            projections = {"q_proj": q, "k_proj": kv, "v_proj": kv}
            if not config.owns_kv(i):  # MLKV: this layer has no k/v of its own
                projections = {"q_proj": q}
            for name, cut in projections.items():
                out[p + f"self_attn.{name}.weight"] = cut
                out[p + f"self_attn.{name}.bias"] = cut
            out[p + "self_attn.o_proj.weight"] = o
            out[p + "mlp.gate_proj.weight"] = rows
            out[p + "mlp.up_proj.weight"] = rows
            out[p + "mlp.down_proj.weight"] = cols
        return out


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: the input features are split over ranks;
    the bias (replicated) is added once, after the sum."""

    def __init__(self, in_local: int, out: int, bias: bool, comm: Collectives, **kw) -> None:
        super().__init__(in_local, out, bias=bias, **kw)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))  # [T, out]
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, stop) of the embedding; other ids read zeros, then one all-reduce."""

    def __init__(self, start: int, stop: int, hidden: int, comm: Collectives, **kw) -> None:
        if kw.get("device") is not None and torch.device(kw["device"]).type == "meta":
            # no init on meta: it imports torch._dynamo (~2 s per rank; see llama.embedding)
            kw = {
                "_weight": torch.empty(stop - start, hidden, dtype=kw.get("dtype"), device="meta")
            }
        super().__init__(stop - start, hidden, **kw)
        self.start = start
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start  # [T]
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # [T, H]
        x = x.masked_fill(~inside[:, None], 0)
        return self.comm.all_reduce(x)


class TensorParallelCausalLM(CausalLM):
    """One rank's slice of a CausalLM. `config` is the slice's (local heads, features and
    vocabulary); `full_config` the checkpoint's. On rank 0 `driver` (a StepChannel) sends
    each forward's inputs and each logits call to the other ranks first, so that they run
    the same collectives in the same order (`distributed/worker.py`)."""

    def __init__(
        self, config: ModelConfig, plan: ShardPlan, comm: Collectives, *, dtype=None, device=None
    ) -> None:
        local = plan.local_config(config)
        super().__init__(local, dtype=dtype, device=device)
        kw = {"dtype": dtype, "device": device}
        self.full_config = config
        self.plan = plan
        self.comm = comm
        self.tensor_parallel_size = plan.size
        self.embed_tokens = VocabParallelEmbedding(*plan.vocab, config.hidden_size, comm, **kw)
        for layer in self.decoder_layers:
            attn, mlp = layer.self_attn, layer.mlp
            h = config.hidden_size
            attn.o_proj = RowParallelLinear(local.q_size, h, config.o_bias, comm, **kw)
            mlp.down_proj = RowParallelLinear(mlp.intermediate, h, False, comm, **kw)
        self.driver: Any = None  # rank 0: a StepChannel
        self._last_hidden: torch.Tensor | None = None
        # rank 0, set by the runner just before a forward: its next compute_logits (1,
        # FOLLOW_LOGITS) or greedy_tokens (2, FOLLOW_TOKENS) is of every row of that forward,
        # so the workers compute them unasked (no LOGITS_LAST)
        self.logits_follow = 0
        self.in_graph = False  # a decode CUDA graph's forward: the ids travel in it
        # rank 0: greedy decode steps gather each rank's argmax, not the logits
        # (MOSKA_TP_ARGMAX_GATHER=0: the logits, for a before/after in one benchmark run)
        self.argmax_gather = os.environ.get("MOSKA_TP_ARGMAX_GATHER", "1") != "0"

    @property
    def graph_capturable(self) -> bool:
        """Whether decode steps may be CUDA graphs: with NCCL (its collectives are
        captured); gloo stages tensors through the host, which a graph cannot hold. Opt-in
        (MOSKA_TP_CUDA_GRAPHS=1) until a 2-GPU run has measured it: captured NCCL
        collectives have hung elsewhere, and eager TP steps are slow but known to work."""
        return self.comm.backend == "nccl" and os.environ.get("MOSKA_TP_CUDA_GRAPHS") == "1"

    def decode_graphs(self, **kw) -> Any:
        """The runner's DecodeGraphs for this rank, DecodeGraphs' arguments (model=this
        model included): `distributed/tp_graphs.py`."""
        from moska.distributed.tp_graphs import TensorParallelGraphs

        return TensorParallelGraphs(**kw)

    def forward(self, input_ids, positions, attn) -> torch.Tensor:
        follow, self.logits_follow = self.logits_follow, 0
        if self.in_graph:  # rank 0's ids (some only on its device) to every rank, captured
            self.comm.broadcast(input_ids)
        elif self.driver is not None:
            self.driver.send_forward(input_ids, positions, attn, logits_follow=follow)
        hidden = super().forward(input_ids, positions, attn)
        self._last_hidden = hidden
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """hidden [N, H] -> logits [N, V] fp32 on rank 0 (None on the others)."""
        if self.driver is not None:
            self.driver.send_logits(hidden, same_as_forward=hidden is self._last_hidden)
        # gathered in the model's dtype and cast after, as one rank casts its product
        local = F.linear(hidden, self.lm_head_weight)  # [N, V_local]
        pad = self.plan.vocab_shard - local.shape[1]
        parts = self.comm.gather(F.pad(local, (0, pad)) if pad else local)
        if parts is None:
            return None
        v, n = self.full_config.vocab_size, self.plan.size
        sizes = [span(v, n, r)[1] - span(v, n, r)[0] for r in range(n)]
        return torch.cat([p[:, :k] for p, k in zip(parts, sizes)], dim=1).float()  # [N, V]

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, H] -> compute_logits(hidden).argmax(-1) [N] int64 on rank 0 (None on
        the others), ties to the lowest id as argmax, without moving the logits: each rank
        sends its rows' (max, id) over its vocabulary range, [N, 2] float64 (16 bytes a row
        instead of 2 * V / n: 32 MB at B = 256, V = 128K, n = 2), and rank 0 takes the
        first rank holding the largest. Rank 0 asks this only of rows whose forward
        announced it (FOLLOW_TOKENS); otherwise it asks for the logits."""
        same = hidden is self._last_hidden
        if self.driver is not None and not self.driver.take_tokens(same_as_forward=same):
            logits = self.compute_logits(hidden)  # not announced: the other ranks are not here
            assert logits is not None  # rank 0
            return logits.argmax(-1)
        local = F.linear(hidden, self.lm_head_weight)  # [N, V_local], as compute_logits
        best = local.argmax(-1)  # the first of equal maxima
        value = local.gather(1, best[:, None])[:, 0]
        pair = torch.stack([value.double(), (best + self.plan.vocab[0]).double()], dim=1)
        parts = self.comm.gather(pair)
        if parts is None:
            return None
        every = torch.stack(parts)  # [n, N, 2], in rank (so vocabulary) order
        rank = every[:, :, 0].argmax(0)  # [N]: the first rank with the row's maximum
        return every[:, :, 1].gather(0, rank[None])[0].long()

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV blocks every rank can hold (the fewest any rank can)."""
        return self.comm.all_reduce_min(num_blocks)


class TensorParallel:
    """What `load_model(..., tensor_parallel=...)` needs to build and fill one rank's slice."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm

    def plan(self, config: ModelConfig) -> ShardPlan:
        return ShardPlan.build(config, self.comm.rank, self.comm.world_size)

    def make_model(self, config: ModelConfig, *, dtype, device) -> TensorParallelCausalLM:
        plan = self.plan(config)
        return TensorParallelCausalLM(config, plan, self.comm, dtype=dtype, device=device)

    def tensor_slices(self, config: ModelConfig) -> dict[str, TensorSlice]:
        return self.plan(config).tensor_slices(config)
