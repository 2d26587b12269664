"""The full-KV baseline of the FlexiCache speed bench (`flexicache_speed.py`): the engine's
paged cache layout read by `paged_decode`, stepped eagerly or replayed from a CUDA graph.

Why a graph: the bench's eager steps launch every op from Python, and on the H200 host the
eager full-KV step took 29 ms of wall time for 9.3 ms on the device (host-bound). The engine
replays decode steps from CUDA graphs; the graph row (`full_graph`) is that strongest
baseline measured by the wall clock: a step is a copy of the tokens and the position into
static buffers and one replay. The step writes the same position every step (as the eager
row does): equal work per step.
"""

from __future__ import annotations

import torch


class FullKV:
    """Paged cache of B sequences, each `pages` contiguous blocks, read by paged_decode. The
    sequence lengths live in a device tensor (`lens`, set by `begin`) so that a captured
    step reads them at replay."""

    def __init__(self, mc, batch, context, pages, bs, dtype, device, ops) -> None:
        self.pages = pages
        shape = (mc.num_kv_layers, batch * self.pages, bs, mc.num_kv_heads, mc.head_dim)
        self.k = torch.randn(shape, dtype=dtype, device=device)
        self.v = torch.randn(shape, dtype=dtype, device=device)
        self.tables = torch.arange(batch * self.pages, dtype=torch.int32, device=device)
        self.tables = self.tables.view(batch, self.pages)
        self.length, self.bs, self.ops, self.sm = context, bs, ops, mc.sm_scale
        self.base = torch.arange(batch, device=device) * self.pages * bs
        self.lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.slots = self.base + context - 1  # pages are contiguous per row

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def begin(self) -> str:
        """Before a step: the lengths and the new token's slots into their device buffers
        (two launches, no wait)."""
        self.lens.fill_(self.length)
        torch.add(self.base, self.length - 1, out=self.slots)
        return "plain"

    def __call__(self, layer, q, k, v):
        kc, vc = self.k[layer], self.v[layer]
        dst = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
        self.ops.kv_write(k, v, *dst, self.slots)
        return self.ops.paged_decode(q, kc, vc, self.tables, self.lens, self.sm)[0]


def eager_step(model, attn: FullKV):
    """step(tokens) -> next tokens, launched op by op."""

    def step(tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.full(tokens.shape, attn.length - 1, device=tokens.device)
        return model.compute_logits(model(tokens, pos, attn)).argmax(-1)

    return step


def graph_step(model, attn: FullKV, tokens: torch.Tensor):
    """step(tokens) -> next tokens by one CUDA graph replay (captured here, after two eager
    runs on a side stream that compile the kernels). The returned tokens are the graph's
    static output: read them before the next step."""
    static_tok = tokens.clone()
    static_pos = torch.full(tokens.shape, attn.length - 1, device=tokens.device)

    def body() -> torch.Tensor:
        return model.compute_logits(model(static_tok, static_pos, attn)).argmax(-1)

    attn.begin()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()

    def step(tokens: torch.Tensor) -> torch.Tensor:
        static_tok.copy_(tokens)
        static_pos.fill_(attn.length - 1)
        graph.replay()
        return out

    step.graph = graph  # type: ignore[attr-defined]  # kept alive with the step
    return step
