"""Plain-PyTorch reference path: dense causal attention over a growing contiguous KV cache.

`DenseAttention` is an `attn` callable for `CausalLM.forward` serving ONE sequence: call the
model with the prompt (prefill), then with one or more new tokens at a time. Each layer keeps
its own k/v [S, Hkv, D]; the T new queries sit at the last T positions and see keys causally.
"""

from __future__ import annotations

import torch

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
        """q [T, Hq, D], k/v [T, Hkv, D] -> o [T, Hq, D] in q.dtype (math in fp32)."""
        if layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k])
            v = torch.cat([self.v[layer_idx], v])
        self.k[layer_idx], self.v[layer_idx] = k, v  # [S, Hkv, D]
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
