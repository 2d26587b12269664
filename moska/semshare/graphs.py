"""The blend's layers past the boundary as one CUDA graph per row bucket.

Why: past the boundary (`blend.py`, step 3) every remaining layer runs over the R kept rows:
~15 launches a layer, ~225 for a 16-layer model, and on an H200 the blend ran host-bound
(14.6 ms of wall time for ~7.7 ms of GPU work at 5,120 tokens). R is padded to a row bucket
(`blend.row_bucket`), so the shapes repeat: each bucket's layers are captured once and a
blend replays them as one launch.

The graph-able function (`BlendGraphs.tail`) reads only static buffers: the rows' hidden
state and residual [R, H], their positions [R], and the request's cache slots of positions
0..S-1 in a buffer of every cache slot (entries past S are never read: a row attends to
positions <= its own, `RowAttention`). It writes the rows' KV of every layer past the
boundary into the cache (the engine's, allocated once: fixed addresses) and the last row's
input to the last layer into two more buffers (`blend.finish_last` completes that row). The same function runs eagerly where no graph is captured (the CPU, a row count
that is no bucket, a first visit), so replay and eager share one code path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moska.semshare.blend import tail_layers
from moska.semshare.row_attention import RowAttention

logger = logging.getLogger(__name__)


class BlendGraphs:
    """Static buffers and one CUDA graph per captured row count for `tail_layers(first)`.

    `capture`: capture graphs (CUDA only; False runs `tail` eagerly from the same buffers,
    which is what the CPU tests compare against the plain eager blend). `buckets`: the row
    counts that may be captured (the row buckets up to `max_rows`); others run eagerly."""

    def __init__(
        self,
        model,
        cache,
        first: int,
        max_rows: int,
        buckets: list[int],
        *,
        capture: bool | None = None,
        row_kernel: bool | None = None,
    ) -> None:
        self.model, self.cache, self.first = model, cache, first
        dev = cache.k.device
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device (capture=False)")
        self.row_kernel = row_kernel
        self.max_rows = max_rows
        self.buckets = set(buckets)
        hidden = model.config.hidden_size
        dtype = model.embed_tokens.weight.dtype
        num_slots = cache.k.shape[1] * cache.k.shape[2]  # every slot of a layer
        self.x = torch.zeros(max_rows, hidden, dtype=dtype, device=dev)
        self.residual = torch.zeros(max_rows, hidden, dtype=dtype, device=dev)
        self.pos = torch.zeros(max_rows, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(num_slots, dtype=torch.int64, device=dev)  # 0: a valid slot
        # the last row's (x, residual) into the last layer, for `blend.finish_last`
        self.last_x = torch.zeros(1, hidden, dtype=dtype, device=dev)
        self.last_residual = torch.zeros(1, hidden, dtype=dtype, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None  # the graphs' shared memory pool (one replays at a time)
        self._stream: torch.cuda.Stream | None = None  # the captures' stream
        self.replays = 0  # tails run by a replay
        self.eager = 0  # tails run eagerly (no graph for the row count)

    def __len__(self) -> int:
        return len(self._graphs)

    def serves(self, cache, first: int, rows: int, positions: int) -> bool:
        """Whether this blend's tail can run here: the same cache (its graphs write the KV at
        the captured cache's addresses: another cache would be left unwritten, and the
        captured one overwritten), the same boundary layer, and buffers large enough."""
        same = cache.k.data_ptr() == self.cache.k.data_ptr() and cache.v.data_ptr() == (
            self.cache.v.data_ptr()
        )
        return same and first == self.first and self.fits(rows, positions)

    def fits(self, rows: int, positions: int) -> bool:
        """Whether a tail of `rows` rows over `positions` cache positions fits the buffers."""
        return 0 < rows <= self.max_rows and positions <= self.slots.shape[0]

    def tail(self, r: int) -> None:
        """The graph-able function: layers [first, L) over the first r rows of the buffers."""
        model = self.model
        pos = self.pos[:r]
        att = RowAttention(
            self.cache, self.slots, pos, model.config.sm_scale, kernel=self.row_kernel,
            ops=model.kernels,
        )  # fmt: skip
        cos, sin = model.rotary.cos_sin_half(pos)
        x, residual = tail_layers(model, att, self.x[:r], self.residual[:r], cos, sin, self.first)
        self.last_x.copy_(x[r - 1 : r])
        self.last_residual.copy_(residual[r - 1 : r])

    def load(self, x, residual, positions, slots) -> None:
        """Copy a blend's inputs into the buffers (device copies: no host sync)."""
        r = x.shape[0]
        self.x[:r].copy_(x)
        self.residual[:r].copy_(residual)
        self.pos[:r].copy_(positions)
        self.slots[: slots.shape[0]].copy_(slots)

    def run(self, x, residual, positions, slots) -> None:
        """Layers [first, L) of rows x [R, H] (residual [R, H], positions [R]) over the
        request's cache slots [S]: a replay where row count R was captured, else eagerly
        from the buffers (and, for a bucket on CUDA, captured for next time)."""
        r = x.shape[0]
        self.load(x, residual, positions, slots)
        g = self._graphs.get(r)
        if g is not None:
            g.replay()
            self.replays += 1
            return
        self.tail(r)  # eager: this blend's KV; also the warm-up before a capture
        self.eager += 1
        if self.capture and r in self.buckets:
            self._capture(r)

    def _capture(self, r: int) -> None:
        """Capture `tail(r)` into the shared pool (graphs replay one at a time). Not through
        `torch.cuda.graph`, which empties the allocator's cache before every capture: ~50
        captures at engine start would give back and re-allocate their memory each time."""
        dev = self.cache.k.device
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        side, main = self._stream, torch.cuda.current_stream(dev)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                # thread_local: the server's other threads may touch CUDA during the capture
                graph.capture_begin(self._pool, capture_error_mode="thread_local")
                try:
                    self.tail(r)
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 - reported; this row count stays eager
            logger.warning("CUDA graph capture of the blend's %d rows failed: %r", r, e)
            self.buckets.discard(r)
            torch.cuda.synchronize(dev)
            return
        finally:
            main.wait_stream(side)
        self._graphs[r] = graph

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Capture every bucket (at engine start: the buffers' rows write their KV to slot
        0, which no request holds yet). Returns the graphs captured."""
        if not self.capture:
            return 0
        gen = torch.Generator(device=self.x.device).manual_seed(0)
        self.x.copy_(torch.randn(self.x.shape, generator=gen, device=self.x.device) * 0.02)
        self.residual.copy_(self.x)
        self.slots.zero_()
        for r in sorted(self.buckets):
            if r > self.max_rows or r in self._graphs:
                continue
            self.pos[:r].copy_(torch.arange(r, device=self.pos.device))
            self.tail(r)  # Triton compiles and cuBLAS picks its algorithms off the capture
            self._capture(r)
        self.slots.zero_()
        return len(self._graphs)
