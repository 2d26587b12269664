"""The KV-bytes arithmetic the composition and SemShareKV benchmarks report, against a hand
count of the K and V tensors a tiny model's layers would hold."""

from types import SimpleNamespace

import pytest
import torch

from moska.bench.kv_cost import KVDims, composition_kv


def hand_count(layers: int, kv_heads: int, head_dim: int, dtype, tokens: int) -> int:
    """Bytes of real K and V tensors, one pair per layer, [tokens, kv_heads, head_dim]."""
    k = torch.empty(tokens, kv_heads, head_dim, dtype=dtype)
    return layers * 2 * k.numel() * k.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_match_a_hand_count(dtype):
    dims = KVDims(num_layers=3, num_kv_heads=2, head_dim=8, dtype_bytes=dtype.itemsize)
    assert dims.bytes_per_token == hand_count(3, 2, 8, dtype, 1)
    assert dims.bytes(17) == hand_count(3, 2, 8, dtype, 17)
    assert dims.bytes(0) == 0
    with pytest.raises(ValueError, match="tokens"):
        dims.bytes(-1)


def test_composition_kv_splits_request_and_shared_bytes():
    dims = KVDims(num_layers=2, num_kv_heads=1, head_dim=4, dtype_bytes=4)  # 64 B per token
    kv = composition_kv(dims, context_tokens=30, request_tokens=10, library_tokens=28)
    assert kv["bytes_per_token"] == 2 * 2 * 1 * 4 * 4
    assert kv["sequential_request_bytes"] == 40 * 64
    assert kv["composed_request_bytes"] == 10 * 64
    assert kv["library_shared_bytes"] == 28 * 64
    assert kv["request_bytes_saved"] == 30 * 64
    assert kv["request_saved_pct"] == 75.0


def test_dims_read_from_a_model_config():
    cfg = SimpleNamespace(num_layers=5, num_kv_heads=3, head_dim=16)  # ModelConfig's names
    dims = KVDims.of(cfg, dtype_bytes=2)
    assert dims.bytes(7) == hand_count(5, 3, 16, torch.float16, 7)
