"""The whole-library bench builds the selections routing gives with top_k >= C (every chunk,
KV head and request, sorted by (chunk, kv_head, req)) without routing."""

import torch

from moska.attention.shared import all_chunk_selections
from moska.bench.kernels_whole_library import every_chunk


def test_every_chunk_is_what_routing_gives_for_all_chunks():
    mine = every_chunk(5, 3, 4, "cpu")
    ref = all_chunk_selections(5, 3, 4, torch.device("cpu"), use_triton=False)
    for a, b in zip(mine[:3], ref[:3]):
        assert torch.equal(a.long(), b.long())
