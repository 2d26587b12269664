"""Scoring a request that reads a library, for ``bench/independent_quality.py``.

``build`` makes a library in memory through moska's builder (the server's), ``route`` (key-max,
PyTorch reference) picks the chunks, and the forward is ``CausalLM`` with an attention that
does what ``attention/backend.py`` does: the request's causal attention over its own tokens,
attention over the routed chunks and an LSE merge (here one masked dense product per layer,
the same math as the grouped kernel + merge, vectorized for CPU), with APE's temperature and
scale on the library part. fp32, CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moska.kernels.router import route
from moska.library.builder import build_in_memory
from moska.library.positions import IndependentOptions


@dataclass(frozen=True)
class Shared:
    """The library part of one evaluation: pools, chunk offsets, routing, APE knobs."""

    library: object  # LoadedLibrary
    top_k: int
    temperature: float = 1.0
    lse_bias: float = 0.0  # log S


class LibraryAttention:
    """``attn(layer, q, k, v)`` for one sequence of request tokens reading a library:
    causal attention over its own tokens, attention over each row's routed chunks, merged by
    LSE (``attention/backend.py``'s math in fp32)."""

    def __init__(self, shared: Shared | None, sm_scale: float) -> None:
        self.shared, self.sm_scale = shared, sm_scale
        self.coverage: list[float] = []

    def __call__(self, layer, q, k, v):
        T, Hq, _D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        qf = q.float()
        kf = k.float().repeat_interleave(G, dim=1)
        vf = v.float().repeat_interleave(G, dim=1)
        s = torch.einsum("thd,shd->hts", qf, kf) * self.sm_scale  # [Hq, T, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, -math.inf)
        if self.shared is not None:
            sh = self.shared
            lib = sh.library
            kp = lib.k_pools[layer].float().repeat_interleave(G, dim=1)  # [S, Hq, D]
            vp = lib.v_pools[layer].float().repeat_interleave(G, dim=1)
            ss = torch.einsum("thd,shd->hts", qf, kp) * (self.sm_scale / sh.temperature)
            if sh.top_k < lib.num_chunks:
                sel = route(q, lib.routing[layer], sh.top_k, use_triton=False)
                allowed = torch.zeros(T, Hkv, lib.num_chunks, dtype=torch.bool)
                allowed[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = True
                offs = lib.chunk_offsets.long()
                row_chunk = torch.bucketize(torch.arange(kp.shape[0]), offs[1:], right=True)
                mask = allowed[:, :, row_chunk]  # [T, Hkv, S]
                mask = mask.repeat_interleave(G, dim=1).permute(1, 0, 2)  # [Hq, T, S]
                ss = ss.masked_fill(~mask, -math.inf)
            ss = ss + sh.lse_bias  # exp(lse + log S) = S * sum exp(logits)
            s = torch.cat([ss, s], dim=2)
            vf = torch.cat([vp, vf], dim=0)
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("hts,shd->thd", p, vf)
        return o.to(q.dtype)


@torch.inference_mode()
def target_loss(lm, ids: list[int], start_pos: int, n_score: int, shared: Shared | None):
    """Summed loss of the last ``n_score`` next-token predictions of ``ids`` (request tokens
    at positions start_pos..), and their count."""
    model = lm.model
    x = torch.tensor(ids)
    pos = torch.arange(start_pos, start_pos + len(ids))
    hidden = model(x, pos, LibraryAttention(shared, lm.config.sm_scale))
    logits = model.compute_logits(hidden[-n_score - 1 : -1])
    return float(F.cross_entropy(logits, x[-n_score:], reduction="sum")), n_score


def build(lm, docs, mode: str, chunk_size: int, sink: bool = False):
    """A library in memory through moska's builder. prefix: ``<eot> d1 \\n d2 \\n ...``;
    independent: each chunk alone; ``sink``: each chunk prefilled after an ``<eot>`` whose row
    is dropped afterwards (what ``chunk_sink`` stores)."""
    bos = lm.tokenizer.bos_token_id
    nl = lm.tokenizer.encode("\n", add_special_tokens=False)
    if mode == "prefix":
        ids = [bos]
        for i, (_, d) in enumerate(docs):
            ids += d + (nl if i + 1 < len(docs) else [])
        lib, _ = build_in_memory(lm, [("all", ids)], "q", chunk_size=chunk_size, mode="prefix",
                                 progress=False)  # fmt: skip
        return lib
    opts = IndependentOptions(chunk_sink=sink)  # APE knobs applied by LibraryAttention
    lib, _ = build_in_memory(lm, docs, "q", chunk_size=chunk_size, mode="independent",
                             progress=False, independent=opts)  # fmt: skip
    return lib
