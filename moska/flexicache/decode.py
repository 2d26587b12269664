"""Running a model over B sequences with a `FlexiKV` store: each prompt once (dense causal
attention; its K/V go to the store's host copy), then decode steps of one token per
sequence that attend through the store's per-head page lists. Used by the tests and by
`moska/bench/flexicache.py`; the engine's own path is `engine_hook.py`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moska.flexicache.store import FlexiKV


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [T, Hq, D], k/v [T, Hkv, D] -> causal o [T, Hq, D] (one sequence)."""
    g = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.repeat_interleave(g, 1).transpose(0, 1)[None],
        v.repeat_interleave(g, 1).transpose(0, 1)[None],
        is_causal=True,
        scale=scale,
    )
    return o[0].transpose(0, 1)


class _PromptAttention:
    def __init__(self, store: FlexiKV, row: int, sm_scale: float) -> None:
        self.store, self.row, self.sm_scale = store, row, sm_scale

    def __call__(self, layer: int, q, k, v):
        self.store.write_prompt(layer, self.row, k, v, q[-1])
        return causal_attention(q, k, v, self.sm_scale)


class _DecodeAttention:
    def __init__(self, store: FlexiKV, decode_fn: Callable, sm_scale: float) -> None:
        self.store, self.decode_fn, self.sm_scale = store, decode_fn, sm_scale

    def __call__(self, layer: int, q, k, v):
        return self.store.attend(layer, q, k, v, self.decode_fn, self.sm_scale)


@torch.inference_mode()
def prefill(model, store: FlexiKV, prompts: torch.Tensor) -> torch.Tensor:
    """prompts [B, T] (equal lengths) -> the last position's logits [B, V] fp32."""
    sm = model.config.sm_scale
    t = prompts.shape[1]
    pos = torch.arange(t, device=prompts.device)
    last = []
    for row in range(prompts.shape[0]):
        hidden = model(prompts[row], pos, _PromptAttention(store, row, sm))
        last.append(model.compute_logits(hidden[-1:]))
    store.finish_prompts(sm)
    return torch.cat(last)


@torch.inference_mode()
def decode_step(model, store: FlexiKV, tokens: torch.Tensor, decode_fn: Callable):
    """tokens [B] (one per sequence, at position store.length) -> logits [B, V] fp32."""
    store.begin_step()
    pos = torch.full_like(tokens, store.length - 1)
    attn = _DecodeAttention(store, decode_fn, model.config.sm_scale)
    logits = model.compute_logits(model(tokens, pos, attn))
    store.finish_step()  # a deferred re-ranking (`deferred_rerank`)
    return logits
