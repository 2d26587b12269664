"""The blend's boundary layer in two parts (`moska/semshare/layer_parts.py`: KV for every
token, attention and MLP for the kept rows only) against the boundary layer run in full over
every token, then narrowed to the kept rows (the blend before the split, written out here
from the same pieces), on the built-in tiny model (CPU, fp32): the same KV at every layer
and position, the same counts and the same last-token hidden state, at one and two first
layers, with and without row buckets, for a whole prompt and a second chunk."""

import pytest
import torch
from test_graphs import BLOCKS, _cache, _kv, _rel

from moska.semshare import blend
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.row_attention import RowAttention, slots_of


def _unsplit(model, cache, table, ids, start, ref, ref_pos, fraction, first, granule):
    """The blend with every first layer in full: (num_reused, num_recomputed)."""
    end = start + ids.shape[0]
    slots = slots_of(table, cache.block_size, 0, end, "cpu")
    new_pos = torch.arange(start, end)
    matched = ref_pos >= 0
    m_idx = matched.nonzero().squeeze(1)
    inv_freq = model.rotary.inv_freq
    blend._copy_reference(
        ref, cache, ref_pos[m_idx], new_pos[m_idx], slots[start:][m_idx], inv_freq
    )
    x = model.embed_tokens(ids)
    cos, sin = model.rotary.cos_sin_half(new_pos)
    ops = model.kernels
    att = RowAttention(cache, slots, new_pos, model.config.sm_scale, causal=start == 0, ops=ops)
    residual = None
    for i in range(first):
        x, residual = model.layers[i](x, residual, cos, sin, att, ops)
    rows, kept = blend._select(
        att, ref, ref_pos, new_pos, matched, m_idx, fraction, inv_freq, granule
    )
    att.keep(rows)
    x, residual = blend.tail_layers(
        model, att, x[rows], residual[rows], cos[rows], sin[rows], first
    )
    return m_idx.numel() - kept, rows.numel()


@pytest.mark.parametrize(("first", "granule", "start"), [(1, 1, 0), (1, 16, 0), (2, 1, 48)])
def test_split_boundary_equals_the_full_layer(blend_cpu, first, granule, start):
    model, _, ref, ids, ref_pos = blend_cpu
    n = ids.shape[0]
    table = list(range(20, BLOCKS))
    old, new = _cache(model, torch.float32, "cpu"), _cache(model, torch.float32, "cpu")
    with torch.inference_mode():
        for c in (old, new):
            if start:
                extend(model, c, table, ids[:start], 0)
        want = _unsplit(model, old, table, ids[start:], start, ref, ref_pos[start:], 0.2,
                        first, granule)  # fmt: skip
        got = blend_prefill(
            model, new, table, ids[start:], start, ref, ref_pos[start:], 0.2, first,
            granule=granule,
        )  # fmt: skip
        # the next token over each cache: what the engine's forward would compute from them
        nxt = torch.tensor([5])
        h_old = extend(model, old, table, nxt, n)
        h_new = extend(model, new, table, nxt, n)
    assert (got.num_reused, got.num_recomputed) == want
    assert 0 < got.num_reused and got.num_recomputed < n - start
    for a, b in zip(_kv(new, n), _kv(old, n), strict=True):
        assert _rel(a, b) < 1e-5
    assert _rel(h_new.double(), h_old.double()) < 1e-5
