"""Counting the host's reads of tensor values, the calls that wait for the device on CUDA
(`item`, `tolist`, `int()`/`float()`/`bool()`, `nonzero`, `.cpu()`/`.numpy()`, indexing by
a boolean mask), on any device: `torch.cuda.set_sync_debug_mode` only sees CUDA, so a CPU
test or dry run counts these calls instead. Used by the FlexiCache tests (a re-ranking step
issues its work without them) and the speed bench's CPU dry run.

The counter is `moska/host_syncs.py`'s (shared with SemShareKV's bench); this module keeps
FlexiCache's names and its set of counted calls (`READ_NAMES`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from moska.host_syncs import HostSyncs, _stack, counting, uncounted

__all__ = ["READ_NAMES", "HostReads", "count_host_reads", "uncounted"]

_current = _stack  # the open counting blocks, innermost last (`bench/flexicache_engine_reads`)

READ_NAMES = frozenset({
    "item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu",
    "numpy",
})  # fmt: skip


class HostReads(HostSyncs):
    """The count (`n`) of one `count_host_reads` block; `paused()` leaves reads uncounted."""

    def __init__(self) -> None:
        super().__init__(READ_NAMES)


@contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """with count_host_reads() as reads: ...; reads.n: the reads inside the block."""
    with counting(HostReads()) as reads:
        yield reads
