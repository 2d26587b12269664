"""Counting the host's reads of tensor values, the calls that wait for the device on CUDA
(`item`, `tolist`, `int()`/`float()`/`bool()`, `nonzero`, `.cpu()`/`.numpy()`, indexing by
a boolean mask), on any device: `torch.cuda.set_sync_debug_mode` only sees CUDA, so a CPU
test or dry run counts these calls instead. Used by the FlexiCache tests (a re-ranking step
issues its work without them) and the speed bench's CPU dry run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_METHODS = (
    *("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero"),
    *("cpu", "numpy"),
)


def _masked(index: Any) -> bool:
    """Whether an index holds a boolean tensor of at least one dimension (a `nonzero`)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() for i in parts)


class HostReads:
    """The count (`n`) of one `count_host_reads` block; `paused()` leaves reads uncounted."""

    def __init__(self) -> None:
        self.n = 0
        self.pause = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause += 1
        try:
            yield
        finally:
            self.pause -= 1


_current: list[HostReads] = []


def uncounted(fn: Callable) -> Callable:
    """`fn` with its reads left out of the count: a CPU reference kernel that stands in for a
    GPU kernel reading nothing back (e.g. `paged_decode_heads_ref`'s lengths)."""

    def wrapper(*args, **kwargs):
        if not _current:
            return fn(*args, **kwargs)
        with _current[-1].paused():
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """with count_host_reads() as reads: ...; reads.n: the reads inside the block."""
    reads = HostReads()
    saved = {name: getattr(torch.Tensor, name) for name in _METHODS}
    saved["__getitem__"] = torch.Tensor.__getitem__
    nonzero_fn = torch.nonzero

    def counting(fn):
        def wrapper(*args, **kwargs):
            reads.n += not reads.pause
            return fn(*args, **kwargs)

        return wrapper

    def getitem(self, index):
        reads.n += not reads.pause and _masked(index)
        return saved["__getitem__"](self, index)

    own = {name for name in saved if name in vars(torch.Tensor)}  # else inherited: delete
    _current.append(reads)
    try:
        for name in _METHODS:
            setattr(torch.Tensor, name, counting(saved[name]))
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign]
        torch.nonzero = counting(nonzero_fn)
        yield reads
    finally:
        _current.pop()
        for name, fn in saved.items():
            if name in own:
                setattr(torch.Tensor, name, fn)
            else:
                delattr(torch.Tensor, name)
        torch.nonzero = nonzero_fn
