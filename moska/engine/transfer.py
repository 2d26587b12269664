"""Small host lists to and from the device without stalling the host.

A copy from pageable host memory waits until the work already queued on the device ends
(the forward in flight); one from pinned memory is queued behind it and returns at once.
"""

from __future__ import annotations

from typing import overload

import torch


def host_tensor(values: list, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """`values` as a host tensor to copy to `device`: pinned when that is a GPU."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if device.type == "cuda" else t


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None):
    """`values` on `device`, copied without blocking the host."""
    return host_tensor(values, dtype, device).to(device, non_blocking=True)


@overload
def to_host_async(t: torch.Tensor) -> torch.Tensor: ...
@overload
def to_host_async(t: None) -> None: ...
def to_host_async(t: torch.Tensor | None) -> torch.Tensor | None:
    """Queue a copy of a device tensor into pinned host memory (CPU tensors pass through);
    read it only after the stream has reached this point (an event)."""
    if t is None or not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
