"""Routing selections: which (request, KV head, chunk) triples attend to shared chunks."""

from typing import NamedTuple

import torch


class Selections(NamedTuple):
    """Selected (request, KV head, chunk) triples, int32 [N] tensors on one device.

    Sorted by (chunk, kv_head, req) and unique, so all selections of one chunk are
    contiguous and can be batched into one grouped attention tile.
    """

    req: torch.Tensor  # [N] int32
    kv_head: torch.Tensor  # [N] int32
    chunk: torch.Tensor  # [N] int32
