"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) with delegated attention.

The model owns projections, norms, RoPE and the MLP; the caller owns the KV cache. Each layer
calls `attn(layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> o [T, Hq, D]` with q and
k already normed (Qwen3) and rotated; `attn` must store k/v and scale scores by
`config.sm_scale` (head_dim ** -0.5).

The first argument is the layer's KV *slot*: its own index, except in an MLKV model
(`model/mlkv.py`), where slot j is the j-th layer that owns KV. A layer that shares an
earlier layer's KV has no k/v projections and calls `attn(slot, q, None, None)`: attend to
the slot's KV (this step's tokens already written by its source layer), write nothing.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import nn

from moska.kernel_ops import KernelOps, kernel_ops
from moska.model.config import ModelConfig
from moska.model.layers import RMSNorm, RotaryEmbedding, SwiGLU


class AttentionFn(Protocol):
    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """Fused qkv projection [q_size + 2 * kv_size, H], optional per-head q/k norm, o_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.q_size, c.kv_size
        # MLKV: a layer that shares a source layer's KV has only the q rows of qkv_proj
        self.kv_slot, self.owns_kv = c.kv_slots[layer_idx], c.owns_kv(layer_idx)
        kv_rows = 2 * c.kv_size if self.owns_kv else 0
        kw = {"dtype": dtype, "device": device}
        self.qkv_proj = nn.Linear(c.hidden_size, c.q_size + kv_rows, bias=c.qkv_bias, **kw)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=c.o_bias, **kw)
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw) if self.owns_kv else None
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionFn,
        ops: KernelOps,
    ) -> torch.Tensor:
        """cos/sin: [T, D/2] fp32 (`RotaryEmbedding.cos_sin_half`); `ops` the kernel table."""
        t = x.shape[0]
        if not self.owns_kv:  # MLKV: reads the KV its source layer wrote
            return self._forward_shared(x, cos, sin, attn, ops)
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            assert self.k_norm is not None  # a layer that owns its KV has both norms
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rotary(q, k, cos, sin)  # Triton: in place on the projection's output
        o = attn(self.kv_slot, q, k, v)  # [T, Hq, D]
        return self.o_proj(o.flatten(1))  # [T, heads * D] (Helix: fewer heads than q)

    def _forward_shared(self, x, cos, sin, attn: AttentionFn, ops: KernelOps) -> torch.Tensor:
        """An MLKV layer without k/v: q only, then attention over its KV slot."""
        t = x.shape[0]
        q = self.qkv_proj(x).view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = ops.rotary(q, q[:, :0], cos, sin)[0]  # no k: an empty [T, 0, D] view
        o = attn(self.kv_slot, q, None, None)  # [T, Hq, D]
        return self.o_proj(o.flatten(1))  # [T, heads * D] (Helix: fewer heads than q)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, layer_idx, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, **kw)

    def forward(self, x, residual, cos, sin, attn: AttentionFn, ops: KernelOps):
        """The residual stream is carried beside the layer's output: returns (out, residual)
        with hidden = out + residual, so each norm also does the add before it (one launch
        with the Triton table). residual None: x is the embedding (the first layer)."""
        h, residual = self.input_layernorm.fused(x, residual, ops)
        h = self.self_attn(h, cos, sin, attn, ops)
        h, residual = self.post_attention_layernorm.fused(h, residual, ops)
        return self.mlp(h, ops), residual


def embedding(num: int, dim: int, dtype: torch.dtype | None, device) -> nn.Embedding:
    """nn.Embedding; on the meta device without its init, which imports torch._dynamo (~2 s of
    CPU in every process that loads a model; the loader overwrites the weights anyway)."""
    if device is not None and torch.device(device).type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim, dtype=dtype, device="meta"))
    return nn.Embedding(num, dim, dtype=dtype, device=device)


class CausalLM(nn.Module):
    """Decoder + LM head. Parameter names follow HF except the fused `qkv_proj`/`gate_up_proj`."""

    def __init__(self, config: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        self.config = config
        kw = {"dtype": dtype, "device": device}
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(config, i, **kw) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, device=device
        )
        # norms, RoPE and SiLU-and-mul: the engine's kernel table (`moska/kernel_ops.py`),
        # handed in by the runner; the PyTorch references until then
        self.kernels: KernelOps = kernel_ops("torch")
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers, typed (``nn.ModuleList`` iterates as plain modules)."""
        return [cast(DecoderLayer, m) for m in self.layers]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the embedding matrix when embeddings are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn
    ) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> final-normed hidden [T, H]."""
        assert input_ids.dim() == 1 and positions.shape == input_ids.shape, (
            f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
            "must both be [T]"
        )
        x = self.embed_tokens(input_ids)  # [T, H]
        ops = self.kernels
        cos, sin = self.rotary.cos_sin_half(positions)  # [T, D/2] fp32 each
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn, ops)
        return self.norm.fused(x, residual, ops)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (rows to sample from) -> logits [N, V] fp32."""
        return torch.nn.functional.linear(hidden, self.lm_head_weight).float()
