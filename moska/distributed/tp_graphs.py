"""CUDA graphs for tensor-parallel decode steps (NCCL): every rank captures and replays the
same graph of the same batch-size bucket, so each captured all-reduce meets its peers.

A decode step eager under TP costs ~15 kernel launches per layer per rank from Python and
every rank's host must keep up with the others at each all-reduce; a graph costs one launch.
NCCL collectives can be captured (they are recorded, not run, during the capture and run
at each replay); the ranks only have to replay the same graphs in the same order, between
the same other collectives. So:

- **Capture** (on first use of a bucket, or ahead of traffic): rank 0 sends GRAPH_CAPTURE
  with the bucket; every rank says whether it can capture that bucket (all_gather_object,
  before any collective of the capture, so that no rank waits alone in one); if all can,
  every rank captures it (a warm-up forward, whose collectives run for real on all ranks
  together, then the captured forward) and answers (gather_object). A rank that cannot or
  failed makes rank 0 raise GraphCaptureError naming it, and the runner goes eager, as one
  GPU does; ranks that captured keep an unused graph. (A rank that fails *inside* the
  warm-up leaves the others in its collective until the group's timeout.)
- **Replay**: rank 0 fills its static buffers, sends GRAPH_STEP with the bucket, the row
  count and the host inputs (positions, slots, seq_lens, block tables) in one control
  message (StepChannel), and replays; the others copy the inputs into the same bucket's
  buffers and replay. The token ids are not in the message: the graph starts with a
  broadcast of rank 0's ids buffer (ids sampled by the previous step are on rank 0's
  device only, under asynchronous scheduling). The header also says that the logits of
  every row follow, so the workers run the LM head and the gather after the replay
  without another message.
- The step metadata (control message) stays outside the graph; only device buffers are
  read by it. Library steps stay eager under TP (graphs of steps without a library only).

All ranks build the same buckets and block width from the same EngineConfig, and the
scratch block (`num_blocks`, agreed by all ranks) is the same; the bucket travels with
every header and a rank checks it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from moska.engine.cuda_graphs import DecodeGraphs, GraphCaptureError, LibrarySpec, _Graph

# this process's TP graphs: released together before the process group goes (teardown.py)
_LIVE: weakref.WeakSet[TensorParallelGraphs] = weakref.WeakSet()


def release_all() -> int:
    """Release the captured graphs of every TensorParallelGraphs of this process (there is
    one process group per process); returns how many graphs were released."""
    return sum(g.release() for g in list(_LIVE))


class TensorParallelGraphs(DecodeGraphs):
    """DecodeGraphs of one tensor-parallel rank: rank 0 (its model has a `driver`, the
    StepChannel) leads; the other ranks follow it from `serve_steps`."""

    def __init__(self, model, **kw) -> None:
        super().__init__(model, **kw)
        self.replays = 0  # decode steps replayed (rank 0: led; others: followed)
        self._follow = 0  # rank 0: the replayed step's logits_follow (control_message.FOLLOW_*)
        self.released = False  # the process group is going: no more captures
        _LIVE.add(self)

    def release(self) -> int:
        """Destroy the captured graphs (after the device finished them), before the process
        group is destroyed: NCCL's destroy waits until no graph holds its captured
        collectives (pytorch/pytorch#115388). Decode steps cannot run afterwards."""
        graphs = list(self._graphs.values())
        self._graphs.clear()
        self.released = True
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if cuda and graphs:
            torch.cuda.synchronize(self.device)
        for g in graphs:
            reset = getattr(g.graph, "reset", None)
            if reset is not None:  # a CUDAGraph (the CPU tests' fake has none)
                reset()
            g.keep.clear()
        self._pool = None
        if cuda and graphs:
            torch.cuda.synchronize(self.device)
        return len(graphs)

    @property
    def channel(self) -> Any:
        return self.model.driver  # rank 0: the StepChannel, set after the model loads

    # ---- rank 0 ------------------------------------------------------------------------
    def capture(self, specs: list[LibrarySpec | None], progress: bool = True) -> int:
        """Ahead of traffic: steps without a library only (library steps are eager)."""
        return super().capture([s for s in specs if s is None], progress)

    def run(self, ids, pos, slots, seq_lens, tables, spec, device_ids=None):
        if spec is not None:
            raise GraphCaptureError("library decode steps run eagerly under tensor parallelism")
        self._follow, self.model.logits_follow = self.model.logits_follow, 0
        hidden, report = super().run(ids, pos, slots, seq_lens, tables, None, device_ids)
        self.model._last_hidden = hidden  # its logits: compute_logits asks nothing more
        self.replays += 1
        return hidden, report

    def _announce(self, b: int, pos, slots, seq_lens, tables) -> None:
        self.channel.send_graph_step(b, pos, slots, seq_lens, tables, self._follow)

    def _get(self, b: int, spec: LibrarySpec | None) -> _Graph:
        """Rank 0: the graph of bucket b, captured by every rank now if there is none."""
        if spec is not None:
            raise GraphCaptureError("library decode steps run eagerly under tensor parallelism")
        if self.released:
            raise GraphCaptureError("the tensor-parallel engine was shut down")
        g = self._find(b, None)
        if g is not None or self.channel is None:
            return g if g is not None else super()._get(b, None)
        with self.channel.lock:  # no other command between the capture and its answers
            self.channel.send_graph_capture(b)
            refused = self.channel.agree(None)
            if refused:
                why = "; ".join(f"rank {r}: {a}" for r, a in sorted(refused.items()))
                raise GraphCaptureError(f"decode batch {b} is not captured ({why})")
            error: GraphCaptureError | None = None
            try:
                g = super()._get(b, None)
            except GraphCaptureError as e:
                error = e
            failed = self.channel.answers()
        if error is not None:
            raise error
        if failed:
            self._graphs.pop(self._key(b, None), None)
            why = "; ".join(f"rank {r}: {a}" for r, a in sorted(failed.items()))
            raise GraphCaptureError(f"CUDA graph capture of decode batch {b} failed ({why})")
        assert g is not None
        return g

    @contextlib.contextmanager
    def _model_context(self) -> Iterator[None]:
        self.model.in_graph = True  # the forward broadcasts the ids instead of a FORWARD
        try:
            yield
        finally:
            self.model.in_graph = False

    # ---- the other ranks ---------------------------------------------------------------
    def can_capture(self, bucket: int) -> str | None:
        """GRAPH_CAPTURE's first answer: None, or why this rank cannot capture `bucket`."""
        if self.released:
            return "this rank is shutting down"
        if bucket not in self.buckets:
            return f"bucket {bucket} is not one of this rank's buckets {self.buckets}"
        return None

    def capture_for_peer(self, bucket: int) -> str | None:
        """GRAPH_CAPTURE, once all ranks agreed: capture bucket `bucket` as rank 0 does;
        None, or why not."""
        try:
            super()._get(bucket, None)
        except GraphCaptureError as e:
            return str(e)
        return None

    def replay_for_peer(self, bucket: int, pos, slots, seq_lens, tables) -> torch.Tensor:
        """GRAPH_STEP: the hidden states [n, H] of the replay of bucket's graph (the ids
        come from rank 0 inside it)."""
        g = self._find(bucket, None)
        n = pos.numel()
        if g is None or n > bucket or tables.shape[1] > self.max_blocks:
            raise RuntimeError(
                f"GRAPH_STEP of {n} rows, {tables.shape[1]} blocks, for bucket {bucket}, "
                f"which this rank has not captured (or is too small): the ranks disagree"
            )
        # host int64 (pinned on a GPU: no wait for the replay in flight) -> device, then
        # into the graph's buffers (int32 where they are) on the device
        dev = self.device
        moved = [t.to(dev, non_blocking=True) for t in (pos, slots, seq_lens, tables)]
        self._fill(g, n, *moved)
        self.replays += 1
        return self._replay(g, n)
