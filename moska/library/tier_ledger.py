"""A tiered library's routed-chunk counts kept on the device and read on the host once per
step, not once per layer: what lets a step whose chunks are known resident run with no host
sync (library/tiers.py `ChunkTiers.attend`'s sync-free path).

Why: reading a layer's routed chunk ids on the host before its launch (`unique().tolist()`)
drains the launch queue every layer; the GPU then idles while the host does the tier's
bookkeeping and launches the layer's kernels again. On the H200 that alone held a tiered
step with every chunk resident to 0.44-0.63x of the all-resident step (bench/results/
tiers_h200_s14.json, `allhit-wait`). When the host needs the chunks only for bookkeeping
(hit and miss counts, the eviction policy's uses, the skip policy's fetches for later steps),
the counts can wait: each layer adds its selections' chunk ids into a [L, C] counter on the
device (one `index_add_`, no sync), the step's counters are copied to pinned host memory
(non-blocking, with an event) when the next step starts, and the host settles them once the
copy is done: at most `max_lag` steps late, and only then does it wait for the device.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from moska.host_syncs import uncounted


@dataclass
class LayerRead:
    """One layer's sync-free read in a step: its counts row once settled, and the chunks
    that were resident when it was launched (what it read; the others it read as empty)."""

    layer: int
    resident: frozenset[int]
    counts: list[int] | None = None


class DemandLedger:
    """Routed selections per (layer, chunk), counted on the device, settled on the host."""

    def __init__(self, num_layers: int, num_chunks: int, device: torch.device, max_lag: int = 2):
        self.device = device
        self.max_lag = max_lag
        self.counts = torch.zeros(num_layers, num_chunks, dtype=torch.int32, device=device)
        self._ones = torch.ones(0, dtype=torch.int32, device=device)
        self._scratch = torch.zeros(num_chunks, dtype=torch.int32, device=device)
        self._reads: dict[int, LayerRead] = {}  # this step's sync-free reads by layer
        # closed steps not yet settled: (copy done event or None, host counts, reads)
        self._pending: deque[tuple[torch.cuda.Event | None, torch.Tensor, list[LayerRead]]]
        self._pending = deque()
        self._seen = -1  # the last layer read: a lower or equal one starts a new step

    def new_step(self, layer: int) -> bool:
        """Whether a read of `layer` starts a new step (layers run in order within one)."""
        fresh = layer <= self._seen
        self._seen = layer
        return fresh

    def _count(self, into: torch.Tensor, chunk: torch.Tensor) -> None:
        n = chunk.numel()
        if n > self._ones.numel():
            size = max(n, 2 * self._ones.numel())
            self._ones = torch.ones(size, dtype=torch.int32, device=self.device)
        if n:
            into.index_add_(0, chunk, self._ones[:n])

    def add(self, layer: int, chunk: torch.Tensor, resident: frozenset[int]) -> None:
        """Count the selections' chunk ids `chunk` [N] int32 (device) of `layer`: one launch."""
        self._count(self.counts[layer], chunk)
        self._reads.setdefault(layer, LayerRead(layer, resident))

    def count_now(self, chunk: torch.Tensor) -> list[int]:
        """Selections per chunk id of `chunk`, read at once: two launches and one host sync
        (what a layer that may miss under "wait" needs before its launch)."""
        self._scratch.zero_()
        self._count(self._scratch, chunk)
        return self._scratch.tolist()

    def close_step(self) -> None:
        """This step's counters to the host (non-blocking on CUDA), the counters cleared."""
        if not self._reads:
            return
        reads = list(self._reads.values())
        self._reads = {}
        if self.device.type == "cuda":  # all layers' rows (a few KiB): no index to upload
            host = torch.empty(self.counts.shape, dtype=torch.int32, pin_memory=True)
            host.copy_(self.counts, non_blocking=True)
            done: torch.cuda.Event | None = torch.cuda.Event()
            assert done is not None
            done.record()
        else:
            host, done = self.counts.clone(), None
        self.counts.zero_()
        self._pending.append((done, host, reads))

    def ready(self, force: bool = False) -> list[LayerRead]:
        """The reads of closed steps whose counters have reached the host, oldest first (a
        step more than `max_lag` behind, or every step when `force`, is waited for)."""
        out: list[LayerRead] = []
        while self._pending:
            done, host, reads = self._pending[0]
            late = force or len(self._pending) > self.max_lag
            if done is not None and not late and not done.query():
                break
            if done is not None:
                done.synchronize()
            self._pending.popleft()
            rows = _rows(host)
            for r in reads:
                r.counts = rows[r.layer]
                out.append(r)
        return out


@uncounted
def _rows(host: torch.Tensor) -> list[list[int]]:
    """A host copy's rows (pinned memory on CUDA, its copy waited for above: no sync)."""
    return host.tolist()
