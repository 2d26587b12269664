"""FlexiCache decode steps replayed from a CUDA graph where they can be (the speed bench's
`--graph`, `flexicache_speed.py`).

Why: eager FlexiCache steps at B = 38 took 25 ms of wall time for 14 ms on the H200 (the host
issued about 15 launches per layer), while the full-KV baseline replays a graph. A plain step
(`FlexiKV.plain_step`: no re-ranking, no page started) launches only work indexed by
device tensors written in place (the position, the head lists' lengths at their last rebuild
and the tokens since), so one graph of it replays every plain step, as long as no layer's pool
tensors were replaced (`FlexiKV.pool_version`: a pool grown or compacted at a re-ranking or a
page start); then it is captured again. Other steps (re-ranking, page start, the first)
run eagerly. A step that fills a page replays too: its pages' copies to the host
(`FlexiKV.queue_write_backs`: a gather and an async copy per layer) follow the replay. A plain
step's attention work is idempotent (lengths set, not incremented; the
token written to the same slot), so the warm-up run before a capture may run it again.
"""

from __future__ import annotations

import torch


class GraphSteps:
    """step(tokens) -> next tokens: a replay for plain steps, eager otherwise. `captures`
    and `replays` count what it did (a recapture costs about one eager step of host time)."""

    def __init__(self, model, attn, tokens: torch.Tensor) -> None:
        self.model, self.attn, self.store = model, attn, attn.store
        self.static_tok = tokens.clone()
        self.static_pos = torch.zeros_like(tokens)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.version = -1
        self.out: torch.Tensor | None = None
        self.captures = self.replays = self.eager = 0
        self.store.defer_write_back = True  # a filled page's copy to the host: after the step

    def _body(self) -> torch.Tensor:
        h = self.model(self.static_tok, self.static_pos, self.attn)
        return self.model.compute_logits(h).argmax(-1)

    def _capture(self) -> None:
        self.graph = None  # its private memory pool goes back first
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()  # the same work as the replay below: idempotent
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._body()
        self.graph, self.version = graph, self.store.pool_version
        self.captures += 1

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        store = self.store
        if not store.plain_step():
            self.eager += 1
            pos = torch.full(tokens.shape, store.length - 1, device=tokens.device)
            out = self.model.compute_logits(self.model(tokens, pos, self.attn)).argmax(-1)
            store.finish_step()
            return out
        self.static_tok.copy_(tokens)
        self.static_pos.fill_(store.length - 1)
        if self.graph is None or self.version != store.pool_version:
            self._capture()
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        self.replays += 1
        store.finish_step()  # a deferred re-ranking; a filled page's copy to the host
        return self.out.clone()  # the static output changes at the next replay

    def counts(self) -> dict:
        return {"graph_captures": self.captures, "graph_replays": self.replays,
                "eager_steps": self.eager}  # fmt: skip
