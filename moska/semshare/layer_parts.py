"""The blend's boundary layer in two parts (`blend.blend_prefill`).

The last of the first layers (the boundary) must write fresh KV for every token of the
range: the rows kept past it are chosen by how far that KV deviates from the reference's.
Its attention, output projection and MLP matter only for the kept rows (their output is
what the layers past the boundary read), so `boundary_kv` runs the layer up to its KV over
every token and `boundary_rest` the remainder over the kept rows: at 8B dims and a fifth
of the rows kept, ~2 TFLOP of a 5,120-token blend's MLP and attention not computed.
"""

from __future__ import annotations

import torch


def boundary_kv(layer, x, residual, cos, sin, att, ops):
    """((slot, q [T, Hq, D]), residual [T, H]): the layer's input norm, projections and
    RoPE over every row; k and v written through `att` (kept as `att.last_fresh`); the
    attention left undone (an empty output: its projection multiplies no row)."""
    h, residual = layer.input_layernorm.fused(x, residual, ops)
    got = []

    def kv_only(slot: int, q: torch.Tensor, k, v) -> torch.Tensor:
        att.write(slot, k, v)
        att.last_fresh = (slot, k, v)
        got.append((slot, q))
        return q[:0]

    layer.self_attn(h, cos, sin, kv_only, ops)
    return got[0], residual


def boundary_rest(layer, slot: int, q, residual, att, ops):
    """(x, residual) out of the layer for the rows of `att` (q [R, Hq, D] their queries,
    residual [R, H] their stream into the attention): attention over the cache, output
    projection, post-attention norm and MLP, as `DecoderLayer.forward` computes them."""
    o = att(slot, q, None, None)  # reads the KV that boundary_kv wrote, writes nothing
    h = layer.self_attn.o_proj(o.flatten(1))
    h, residual = layer.post_attention_layernorm.fused(h, residual, ops)
    return layer.mlp(h, ops), residual
