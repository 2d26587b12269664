"""CUDA graphs of the engine's plain FlexiCache decode steps (`PlainStep`, `plain_lists.py`).

Why: a plain step reads only the per-head lists kept from the step before (every layer's
tables [L, B, Hkv, W] and lengths [L, B, Hkv]), so, as in the bench's page store
(`moska/bench/flexicache_graph.py`: plain steps 11.9 ms from a graph at B = 38 on the H200
against 25 ms eager), its model forward is replayed from a graph: one graph per (batch, list
width), whose static inputs (token ids, positions, KV slots, the lists) each step copies in.
Steps that rebuild their lists (re-rankings, hand-offs, a new batch) run eagerly; the
engine's own `DecodeGraphs` stay off under FlexiCache. A plain step's work is idempotent
(its token's K/V written to the same slot, the lists read as they are), so the warm-up run
before a capture and the capture's first replay may both run it.

`fake=True` (CPU tests): a "graph" is the model called again on the static inputs, so the
static-input plumbing is tested without CUDA.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from moska.attention.metadata import AttentionMetadata
from moska.flexicache.plain_lists import PlainStep

logger = logging.getLogger(__name__)


class _FakeGraph:
    """A graph stand-in on the CPU: replay = run the captured call again."""

    def __init__(self, fn, out: torch.Tensor) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


@dataclass
class _Graph:
    ids: torch.Tensor
    pos: torch.Tensor
    slots: torch.Tensor
    step: PlainStep  # static lists
    graph: Any = None
    hidden: torch.Tensor | None = None
    keep: list = field(default_factory=list)


class PlainGraphs:
    """hidden = run(meta, ids, pos): a replay when `meta.flexi` is a `PlainStep` (None
    otherwise: the runner runs the model eagerly). At most `max_graphs` graphs are kept
    (the least recently used goes)."""

    def __init__(self, model, attention, device, fake: bool = False, max_graphs: int = 4):
        self.model, self.attention, self.device = model, attention, torch.device(device)
        self.fake = fake
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple[int, ...], _Graph] = OrderedDict()
        self._pool: Any = None
        self.captures = self.replays = 0
        self.failed: str | None = None  # a capture failed: eager from then on

    def run(self, meta: AttentionMetadata, ids: torch.Tensor, pos: torch.Tensor):
        step = meta.flexi
        if self.failed is not None or not isinstance(step, PlainStep) or meta.groups:
            return None
        # global slots (`slots=shared`) read the flat cache: a graph of the other kind
        # reads the wrong tensors (a test swapping FlexiEngines on one runner found it)
        key = (ids.numel(), *step.tables.shape, step.flat is not None)
        g = self._graphs.get(key)
        if g is None:
            g = _Graph(
                ids.clone(), pos.clone(), meta.slot_mapping.clone(),
                PlainStep(step.tables.clone(), step.lens.clone(), step.flat),
            )  # fmt: skip
            try:
                self._capture(g)
            except Exception as e:  # noqa: BLE001 - reported; the steps run eagerly
                self.failed = repr(e)
                logger.warning("FlexiCache plain-step graph capture failed (eager): %r", e)
                return None
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = g
            self.captures += 1
        else:
            self._graphs.move_to_end(key)
        g.ids.copy_(ids)
        g.pos.copy_(pos)
        g.slots.copy_(meta.slot_mapping)
        g.step.tables.copy_(step.tables)
        g.step.lens.copy_(step.lens)
        g.graph.replay()
        self.replays += 1
        step.q_buf = g.step.q_buf  # the replay's queries (a deferred re-ranking's)
        return g.hidden

    def _capture(self, g: _Graph) -> None:
        n, dev = g.ids.numel(), g.ids.device
        meta = AttentionMetadata(
            slot_mapping=g.slots,
            cu_q_lens=torch.arange(n + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(n, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(n, 1, dtype=torch.int32, device=dev),
            decode_only=True,
        )
        meta.flexi = g.step
        bound = self.attention.bind(meta)
        g.keep = [meta, bound]
        if self.fake:
            g.hidden = self.model(g.ids, g.pos, bound)
            g.graph = _FakeGraph(lambda: self.model(g.ids, g.pos, bound), g.hidden)
            return
        with torch.cuda.device(dev):
            side = torch.cuda.Stream(device=dev)  # warm-up (Triton compiles) off the capture
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self.model(g.ids, g.pos, bound)
            torch.cuda.current_stream(dev).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                g.hidden = self.model(g.ids, g.pos, bound)
        g.graph = graph


def plain_graphs(runner, config) -> PlainGraphs | None:
    """The runner's plain-step graphs: FlexiCache on, on CUDA, not `enforce_eager`, one
    device (no tensor or context parallelism)."""
    if runner.flexi is None or runner.device.type != "cuda" or config.enforce_eager:
        return None
    if runner.tensor_parallel_size > 1 or getattr(runner.model, "kv_parallel", None) is not None:
        return None
    return PlainGraphs(runner.model, runner.attention, runner.device)
