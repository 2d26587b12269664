"""Counting the host's syncs with the device: calls that need a tensor's values on the host
(`item`, `tolist`, `int()`/`float()`/`bool()`, `nonzero`, `unique`, `.cpu()`/`.numpy()`,
indexing by a boolean mask, ...), by name, on any device. `torch.cuda.set_sync_debug_mode`
only sees CUDA, so a CPU test or dry run counts these calls instead: on a GPU each one stalls
the launch queue. Used by the FlexiCache tests and benches (`flexicache/host_reads.py`, the
total) and SemShareKV's per-stage counts (`bench/semshare_path.py`, by name).

A `TorchFunctionMode`: it sees tensor methods and torch functions alike, counts a call once
even when its implementation makes further torch calls, and is per thread (another thread's
reads, e.g. a server's engine thread, do not count)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

# tensor methods / torch functions whose result needs the device's data on the host; `to`
# counts only a copy to the host of a device tensor, `repeat_interleave` only by a tensor of
# repeats without `output_size`; boolean-mask indexing counts as "bool-mask index"
SYNC_NAMES = frozenset({
    "item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero",
    "unique", "cpu", "numpy", "argwhere", "masked_select", "repeat_interleave", "to",
})  # fmt: skip


def _masked(index: Any) -> bool:
    """Whether an index holds a boolean tensor (its result's shape depends on its values)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)


def sync_name(func: Any, args: tuple, kwargs: dict, names: frozenset[str]) -> str | None:
    """The name a call counts under, or None when it does not wait for the device's data
    (whatever the device of its tensor: the caller filters by device)."""
    name = getattr(func, "__name__", str(func))
    t = args[0] if args else None
    if name == "__getitem__":
        return "bool-mask index" if len(args) > 1 and _masked(args[1]) else None
    if name not in names:
        return None
    if name == "repeat_interleave":  # by an int, or with output_size: no sync
        by_tensor = len(args) > 1 and isinstance(args[1], torch.Tensor)
        return name if by_tensor and "output_size" not in kwargs else None
    if name == "to":
        on_device = isinstance(t, torch.Tensor) and t.device.type != "cpu"
        to_host = any(str(x) == "cpu" for x in (*args[1:], kwargs.get("device")))
        return "to(cpu)" if on_device and to_host else None
    return name


class HostSyncs(TorchFunctionMode):
    """The syncs of one `count_host_syncs` block: `counts` by name, `n` in all; `paused()`
    (or `pause` > 0) leaves calls uncounted.

    device_only: count only calls on a tensor off the host (a GPU run), else calls on any
    device (a CPU run: they would sync were the tensor on a GPU). host_copies: `.cpu()` of
    a tensor already on the host counts (it would be a copy from a GPU there; off for
    tensors that live on the host in every run, e.g. SemShareKV's LSH index)."""

    def __init__(
        self,
        names: frozenset[str] = SYNC_NAMES,
        device_only: bool = False,
        host_copies: bool = True,
    ) -> None:
        super().__init__()
        self.names, self.device_only, self.host_copies = names, device_only, host_copies
        self.counts: Counter[str] = Counter()
        self.pause = 0

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause += 1
        try:
            yield
        finally:
            self.pause -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if not self.pause and t is not None and not (self.device_only and t.device.type == "cpu"):
            name = sync_name(func, args, kwargs, self.names)
            if name is not None and (name != "cpu" or self.host_copies or t.device.type != "cpu"):
                self.counts[name] += 1
        return func(*args, **kwargs)


_stack: list[HostSyncs] = []  # the open `count_host_syncs` blocks, innermost last


def current() -> HostSyncs | None:
    """The innermost open `count_host_syncs` block's counts, if any."""
    return _stack[-1] if _stack else None


def uncounted(fn: Callable) -> Callable:
    """`fn` with its syncs left out of the count: a CPU reference kernel that stands in for a
    GPU kernel reading nothing back (e.g. `paged_decode_heads_ref`'s lengths)."""

    def wrapper(*args, **kwargs):
        if not _stack:
            return fn(*args, **kwargs)
        with _stack[-1].paused():
            return fn(*args, **kwargs)

    return wrapper


S = TypeVar("S", bound=HostSyncs)


@contextmanager
def counting(syncs: S) -> Iterator[S]:
    """Counts into `syncs` (a `HostSyncs`, or a subclass of it) inside the block."""
    _stack.append(syncs)
    try:
        with syncs:
            yield syncs
    finally:
        _stack.pop()


@contextmanager
def count_host_syncs(
    names: frozenset[str] = SYNC_NAMES, device_only: bool = False, host_copies: bool = True
) -> Iterator[HostSyncs]:
    """with count_host_syncs() as syncs: ...; syncs.n, syncs.counts: the syncs inside."""
    with counting(HostSyncs(names, device_only, host_copies)) as syncs:
        yield syncs
