"""Re-rotating a stored rotated key by the position difference equals rotating its
unrotated form at the new position (the store keeps rotated keys)."""

import pytest
import torch

from moska.model.config import RopeScaling
from moska.model.layers import RotaryEmbedding, apply_rope
from moska.semshare.rope_shift import rotate_by


def _scalings():
    plain = RopeScaling()
    llama3 = RopeScaling(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=256,
    )
    return [plain, llama3]


def _rope(k, positions, inv_freq):
    """k rotated at `positions` in fp32, with angles taken in fp64: the model's own fp32
    angles lose ~1e-5 at position 3000, which would hide the error under test."""
    freqs = positions.double()[:, None] * inv_freq.double()[None, :]  # [T, D/2]
    cos = torch.cat((freqs.cos(), freqs.cos()), -1).float()[:, None, :]
    sin = torch.cat((freqs.sin(), freqs.sin()), -1).float()[:, None, :]
    return apply_rope(k, cos, sin)


@pytest.mark.parametrize("scaling", _scalings(), ids=["default", "llama3"])
def test_rerotated_key_equals_key_rotated_at_new_position(scaling):
    gen = torch.Generator().manual_seed(0)
    t, h, d = 97, 3, 64
    rope = RotaryEmbedding(d, 10000.0, scaling)
    k = torch.randn(t, h, d, generator=gen)  # [T, Hkv, D] before rotation
    old = torch.randint(0, 3000, (t,), generator=gen)
    new = torch.randint(0, 3000, (t,), generator=gen)  # deltas of both signs
    stored = _rope(k, old, rope.inv_freq)  # as the paged cache holds it
    want = _rope(k, new, rope.inv_freq)
    got = rotate_by(stored, new - old, rope.inv_freq)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-5, float(rel)
    # a layer axis in front (the store's [L, N, Hkv, D]) rotates every layer alike
    both = rotate_by(torch.stack([stored, 2 * stored]), new - old, rope.inv_freq)
    assert torch.allclose(both[1], 2 * got, rtol=1e-5, atol=1e-5)


def test_zero_delta_is_identity_and_dtype_is_kept():
    rope = RotaryEmbedding(32, 500000.0, RopeScaling())
    k = torch.randn(5, 2, 32, dtype=torch.float16)
    out = rotate_by(k, torch.zeros(5, dtype=torch.int64), rope.inv_freq)
    assert out.dtype == torch.float16 and torch.equal(out, k)
