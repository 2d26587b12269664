"""Plain-PyTorch reference path: dense causal attention over a growing contiguous KV cache.

`reference_logits` is a second, functional implementation of the whole decoder straight from
the checkpoint's HF-named tensors (MLKV included), independent of `CausalLM`: tests check the
model against it.

`DenseAttention` is an `attn` callable for `CausalLM.forward` serving ONE sequence: call the
model with the prompt (prefill), then with one or more new tokens at a time. Each layer keeps
its own k/v [S, Hkv, D]; the T new queries sit at the last T positions and see keys causally.
"""

from __future__ import annotations

import torch

from moska.model.config import ModelConfig
from moska.model.layers import rope_inv_freq
from moska.model.llama import CausalLM


class DenseAttention:
    def __init__(self, sm_scale: float | None = None) -> None:
        self.sm_scale = sm_scale
        self.k: dict[int, torch.Tensor] = {}  # layer -> [S, Hkv, D]
        self.v: dict[int, torch.Tensor] = {}  # layer -> [S, Hkv, D]

    def reset(self) -> None:
        self.k.clear()
        self.v.clear()

    def seq_len(self, layer_idx: int = 0) -> int:
        return self.k[layer_idx].shape[0] if layer_idx in self.k else 0

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> o [T, Hq, D] in q.dtype (math in fp32).
        k/v None (an MLKV layer sharing its slot): attend to the slot's KV as it is."""
        if k is None:
            k, v = self.k[layer_idx], self.v[layer_idx]
        elif layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k])
            v = torch.cat([self.v[layer_idx], v])
        self.k[layer_idx], self.v[layer_idx] = k, v  # [S, Hkv, D] (unchanged if shared)
        t, hq, d = q.shape
        s, hkv = k.shape[0], k.shape[1]
        group = hq // hkv
        scale = self.sm_scale if self.sm_scale is not None else d**-0.5
        kf = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        vf = v.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        scores = torch.einsum("thd,shd->hts", q.float(), kf) * scale  # [Hq, T, S]
        q_pos = torch.arange(s - t, s, device=q.device)[:, None]  # [T, 1]
        k_pos = torch.arange(s, device=q.device)[None, :]  # [1, S]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        o = torch.einsum("hts,shd->thd", scores.softmax(-1), vf)  # [T, Hq, D]
        return o.to(q.dtype)


@torch.inference_mode()
def greedy_generate(model: CausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with DenseAttention, one token per step. Returns only the new tokens."""
    attn = DenseAttention(model.config.sm_scale)
    device = model.device
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model(ids, positions, attn)  # [T, H]
        next_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(next_id)
        ids = torch.tensor([next_id], dtype=torch.long, device=device)
        positions = positions[-1:] + 1
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x @ W.T (+ bias when the checkpoint has one) for the HF module `name`."""
    y = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return y if bias is None else y + bias


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by rotate-half RoPE at `positions` [T]."""
    ang = positions.double()[:, None] * inv_freq.double()[None, :]  # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.no_grad()
def reference_logits(
    config: ModelConfig, tensors: dict[str, torch.Tensor], input_ids: list[int]
) -> torch.Tensor:
    """Logits [T, V] (float64) of one sequence, computed in float64 from HF-named weights.

    Plain dense causal attention; a layer whose ``kv_source_layers`` entry names another
    layer uses that layer's keys and values (computed from that layer's own input) and has
    no k/v of its own (any in ``tensors`` are ignored)."""
    c = config
    w = {name: t.double() for name, t in tensors.items()}
    ids = torch.tensor(input_ids, dtype=torch.long)
    t = len(input_ids)
    pos = torch.arange(t)
    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    sources = c.kv_source_layers or tuple(range(c.num_layers))
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # source layer -> k, v [T, Hkv, D]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][ids]  # [T, H]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        x_in = _rms(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = _linear(x_in, w, p + "self_attn.q_proj").view(t, c.num_heads, c.head_dim)
        if c.qk_norm:
            q = _rms(q, w[p + "self_attn.q_norm.weight"], c.rms_norm_eps)
        if sources[i] == i:
            k = _linear(x_in, w, p + "self_attn.k_proj").view(t, c.num_kv_heads, c.head_dim)
            v = _linear(x_in, w, p + "self_attn.v_proj").view(t, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                k = _rms(k, w[p + "self_attn.k_norm.weight"], c.rms_norm_eps)
            kv[i] = (_rope(k, pos, inv_freq), v)
        k, v = kv[sources[i]]
        q = _rope(q, pos, inv_freq)
        g = c.num_heads // c.num_kv_heads
        kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [T, Hq, D]
        scores = torch.einsum("thd,shd->hts", q, kk) * c.sm_scale  # [Hq, T, T]
        scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.einsum("hts,shd->thd", scores.softmax(-1), vv).reshape(t, c.q_size)
        x = x + _linear(o, w, p + "self_attn.o_proj")
        h = _rms(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], c.rms_norm_eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T
