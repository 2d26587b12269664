"""CUDA graphs for decode steps: one captured model forward per batch-size bucket.

A decode step of B requests is padded to the next bucket b >= B (1, 2, 4, ..., max_batch)
and replayed from a graph captured on first use (or ahead of traffic by `capture`, as
`moska serve` does at startup), so the step costs one graph launch instead
of a few hundred kernel launches from Python. The graph reads static input buffers (token
ids, positions, KV slots, context lengths, block tables); a step copies its inputs into the
first B rows and points the padding rows at a scratch KV block that no request owns, so
they write and read nothing live. Steps with a shared library are graphed too when every
row reads the same library (keyed by library, top_k and scorer); anything else, and steps
larger than the largest bucket, run eagerly.

Under tensor parallelism (NCCL) every rank holds the same graphs: the collectives are
captured, and `distributed/tp_graphs.py` has the other ranks capture and replay the same
bucket as rank 0, through the hooks `_announce` and `_model_context`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from moska.attention.backend import PagedAttention
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.attention.routing_report import GroupRouting

if TYPE_CHECKING:
    from moska.attention.metadata import SharedLibrary

logger = logging.getLogger(__name__)


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured; the runner then stays eager."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # [b] int64
    pos: torch.Tensor  # [b] int64
    slots: torch.Tensor  # [b] int64
    seq_lens: torch.Tensor  # [b] int32
    tables: torch.Tensor  # [b, W] int32
    hidden: torch.Tensor | None  # [b, H], written by each replay
    group: LibraryGroup | None
    # the group's routing report (set at capture), its tensors written by each replay
    routing: GroupRouting | None = None
    library: weakref.ref[SharedLibrary] | None = None  # the library the graph reads
    keep: list = field(default_factory=list)


@dataclass(frozen=True)
class LibrarySpec:
    """The one library every row of a decode step reads."""

    name: str  # the build id: graphs are keyed by build, never by library name
    library: SharedLibrary
    top_k: int
    scorer: str
    record: bool
    policy: Any = None  # moska.routing.RoutingPolicy (graph-safe); None: the default


class DecodeGraphs:
    def __init__(
        self,
        model,
        attention: PagedAttention,
        scratch_block: int,
        block_size: int,
        max_blocks: int,
        max_batch: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.attention = attention
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.device = device
        self.buckets = []
        b = 1
        while b < max_batch:
            self.buckets.append(b)
            b *= 2
        self.buckets.append(max_batch)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool: Any = None  # the graphs' shared memory pool, made at the first capture
        self.captures = 0  # graphs captured so far

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(
        self,
        ids: torch.Tensor,  # [B] int64, CPU
        pos: torch.Tensor,  # [B] int64, CPU
        slots: torch.Tensor,  # [B] int64, CPU
        seq_lens: torch.Tensor,  # [B] int32, CPU
        tables: torch.Tensor,  # [B, max_blocks_now] int32, CPU
        spec: LibrarySpec | None,
        device_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, GroupRouting | None]:
        """Hidden states [B, H] of one decode step, and its library group's routing report
        (rows past B are padding). `device_ids` = (rows, tokens)
        on the device overwrite those rows of `ids` (tokens the host does not have yet)."""
        n = ids.numel()
        b = self.bucket(n)
        assert b is not None and tables.shape[1] <= self.max_blocks
        g = self._get(b, spec)
        self._fill(g, n, pos, slots, seq_lens, tables)  # the padding ids too
        g.ids[:n].copy_(ids, non_blocking=True)
        if device_ids is not None:
            g.ids.index_copy_(0, *device_ids)
        self._announce(b, pos, slots, seq_lens, tables)
        return self._replay(g, n), g.routing

    def _fill(self, g: _Graph, n: int, pos, slots, seq_lens, tables) -> None:
        """The graph's static inputs but the ids: n rows, then padding."""
        self._pad(g, n)
        g.pos[:n].copy_(pos, non_blocking=True)
        g.slots[:n].copy_(slots, non_blocking=True)
        g.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        g.tables[:n, : tables.shape[1]].copy_(tables, non_blocking=True)

    def _replay(self, g: _Graph, n: int) -> torch.Tensor:
        cuda = self.device.type == "cuda"  # (a CPU test replays a fake graph)
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            g.graph.replay()
        assert g.hidden is not None  # set by the capture
        return g.hidden[:n]

    def _announce(self, b: int, pos, slots, seq_lens, tables) -> None:
        """Before a replay of bucket b: tell the ranks that replay with this one (none)."""

    def _model_context(self) -> contextlib.AbstractContextManager:
        """Around the model's calls of a capture (its warm-up and the captured one)."""
        return contextlib.nullcontext()

    def capture(self, specs: list[LibrarySpec | None], progress: bool = True) -> int:
        """Capture, ahead of traffic, every bucket for each spec (None: steps without a
        library) that has no graph yet; largest bucket first, so the smaller graphs reuse
        its memory pool. Returns how many graphs were captured. Raises GraphCaptureError."""
        from tqdm.auto import tqdm

        todo = [(b, s) for s in specs for b in reversed(self.buckets) if self._find(b, s) is None]
        before = self.captures
        for b, s in tqdm(todo, desc="Capturing CUDA graphs", unit="graph", disable=not progress):
            self._get(b, s)
        return self.captures - before

    def _key(self, b: int, spec: LibrarySpec | None) -> tuple:
        if spec is None:
            return (b,)
        return (b, spec.name, id(spec.library), spec.top_k, spec.scorer, spec.record, spec.policy)

    def _find(self, b: int, spec: LibrarySpec | None) -> _Graph | None:
        g = self._graphs.get(self._key(b, spec))
        if (
            g is not None
            and g.library is not None
            and (spec is None or g.library() is not spec.library)
        ):
            return None  # the library was reloaded: recapture
        return g

    def _get(self, b: int, spec: LibrarySpec | None) -> _Graph:
        """The graph of bucket b for spec, captured now if there is none."""
        g = self._find(b, spec)
        if g is None:
            self._prune()
            try:
                g = self._capture(b, spec)
            except Exception as e:  # noqa: BLE001 - reported, and the runner goes eager
                raise GraphCaptureError(f"CUDA graph capture of decode batch {b} failed: {e!r}")
            self._graphs[self._key(b, spec)] = g
            self.captures += 1
        return g

    def _prune(self) -> None:
        dead = [k for k, g in self._graphs.items() if g.library is not None and g.library() is None]
        for k in dead:
            del self._graphs[k]

    def _pad(self, g: _Graph, n: int) -> None:
        # padding rows: token 0 at position 0, written to and read from the scratch block
        g.ids[n:].zero_()
        g.pos[n:].zero_()
        g.slots[n:].fill_(self.scratch_block * self.block_size)
        g.seq_lens[n:].fill_(1)
        g.tables[n:].fill_(self.scratch_block)

    def _capture(self, b: int, spec: LibrarySpec | None) -> _Graph:
        dev = self.device
        g = _Graph(
            graph=torch.cuda.CUDAGraph(),
            ids=torch.empty(b, dtype=torch.int64, device=dev),
            pos=torch.empty(b, dtype=torch.int64, device=dev),
            slots=torch.empty(b, dtype=torch.int64, device=dev),
            seq_lens=torch.empty(b, dtype=torch.int32, device=dev),
            tables=torch.empty((b, self.max_blocks), dtype=torch.int32, device=dev),
            hidden=None,
            group=None,
        )
        self._pad(g, 0)  # warm-up and capture touch only the scratch block
        meta = AttentionMetadata(
            slot_mapping=g.slots,
            cu_q_lens=torch.arange(b + 1, dtype=torch.int32, device=dev),
            seq_lens=g.seq_lens,
            block_tables=g.tables,
            decode_only=True,
        )
        if spec is not None:
            g.group = LibraryGroup(
                library=spec.library,
                rows=torch.arange(b, dtype=torch.int64, device=dev),
                top_k=spec.top_k,
                scorer=spec.scorer,
                policy=spec.policy,
                all_rows=True,
                record=spec.record,
            )
            meta.groups.append(g.group)
            g.library = weakref.ref(spec.library)
        bound = self.attention.bind(meta)
        if g.group is not None:
            g.routing = bound.routing[0]
        logger.info(
            "capturing a CUDA graph for decode batch %d%s",
            b,
            "" if spec is None else f" with library {spec.name!r}",
        )
        with torch.cuda.device(dev):
            side = torch.cuda.Stream(device=dev)  # warm-up (Triton compiles) off the capture
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), self._model_context():
                self.model(g.ids, g.pos, bound)
            torch.cuda.current_stream(dev).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: the server's other threads may touch CUDA while this one captures
            graph = torch.cuda.graph(g.graph, pool=self._pool, capture_error_mode="thread_local")
            with graph, self._model_context():
                if g.routing is not None:  # the replays' tensors, not the warm-up's
                    g.routing.clear()
                g.hidden = self.model(g.ids, g.pos, bound)
        if g.group is not None:
            # the graph must not keep an unloaded library alive; the group stays for the
            # tensors the graph reads (its rows) and is never read as a group again
            g.group.library = None  # type: ignore[assignment]
        g.keep = [meta, bound]
        return g
