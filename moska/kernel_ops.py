"""Which implementation runs each op: one frozen table, chosen once per engine from the config.

`kernel_ops("triton" | "torch" | "auto", device)` picks the Triton launchers (`kernels/`) or
plain PyTorch (the references; for paged attention, the shared-chunk attention and the
merge, faster forms of them in `kernels/paged_attention_torch.py` and
`kernels/shared_attention_torch.py`) for every op the engine runs: attention (paged decode and
prefill, grouped shared-chunk attention, the LSE merge of selections, the KV write), the
routing scorers, and the decoder's RMSNorm (+ residual add), RoPE and SiLU-and-mul. The
runner hands the table to the attention backend and to the model (`CausalLM.kernels`), so
`attention="torch"` means no Triton launch anywhere, on any device, and no module looks at
its tensors' device to decide. Each launcher still checks its own inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KINDS = ("triton", "torch")


@dataclass(frozen=True)
class KernelOps:
    """One implementation per op. Signatures (shapes in the launchers' docstrings):

    paged_decode(q, k_cache, v_cache, block_tables, seq_lens, sm_scale) -> (o, lse)
    paged_prefill(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale) -> (o, lse)
    paged_decode_heads(q, k_pages, v_pages, head_tables, head_lens, sm_scale) -> (o, lse):
        decode over a per-KV-head page list (FlexiCache, `kernels/paged_heads.py`)
    grouped_shared(q, k_pool, v_pool, chunk_offsets, sel, sm_scale, ...) -> (o, lse)
    merge_selections(o, lse, o_sel, lse_sel, sel) -> (o, lse)
    kv_write(k, v, k_cache, v_cache, slot_mapping): the new K/V into the cache
    rms_norm(x, weight, eps, residual=None) -> norm(x) or (norm(x + residual), x + residual)
    rotary(q, k, cos, sin) -> (q, k) rotated; cos/sin [T, D/2] fp32 (the Triton one in place)
    silu_and_mul(x [T, 2I]) -> silu(gate) * up [T, I]

    `triton_routing`: the routing scorers (`kernels/router.py`, `routing/`) launch their
    Triton kernels (True) or run their PyTorch references (False); routing takes this as
    its `use_triton` argument."""

    name: str
    paged_decode: Callable
    paged_prefill: Callable
    paged_decode_heads: Callable
    grouped_shared: Callable
    merge_selections: Callable
    kv_write: Callable
    rms_norm: Callable
    rotary: Callable
    silu_and_mul: Callable
    triton_routing: bool


def resolve_kind(kind: str, device: torch.device | str) -> str:
    """`auto`: "triton" on CUDA, "torch" elsewhere; "triton" / "torch" as given."""
    if kind == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if kind not in KINDS:
        raise ValueError(f"unknown kernel implementation {kind!r}; use 'triton', 'torch' or 'auto'")
    return kind


def kernel_ops(kind: str, device: torch.device | str = "cpu") -> KernelOps:
    """The table for `kind` ("triton", "torch", or "auto": by `device`)."""
    return _TABLES[resolve_kind(kind, device)]()


def _triton() -> KernelOps:
    from moska.kernels import (
        activation,
        kv_write,
        merge,
        paged_attention,
        paged_heads,
        rms_norm,
        shared_attention,
    )

    return KernelOps(
        name="triton",
        paged_decode=paged_attention.paged_decode_attention,
        paged_prefill=paged_attention.paged_prefill_attention,
        paged_decode_heads=paged_heads.paged_decode_heads,
        grouped_shared=shared_attention.grouped_shared_attention,
        merge_selections=merge.merge_selections,
        kv_write=kv_write.kv_write,
        rms_norm=rms_norm.rms_norm,
        rotary=_rotary_triton,
        silu_and_mul=activation.silu_and_mul,
        triton_routing=True,
    )


def _torch() -> KernelOps:
    from moska.kernels import activation, kv_write, paged_heads, rms_norm, shared_attention_torch

    return KernelOps(
        name="torch",
        paged_decode=_paged_decode_torch,
        paged_prefill=_paged_prefill_torch,
        paged_decode_heads=paged_heads.paged_decode_heads_ref,
        # batched forms of the references (one product per chunk and KV head)
        grouped_shared=shared_attention_torch.grouped_shared_attention_torch,
        merge_selections=shared_attention_torch.merge_selections_torch,
        kv_write=kv_write.kv_write_ref,
        rms_norm=rms_norm.rms_norm_ref,
        rotary=_rotary_ref,
        silu_and_mul=activation.silu_and_mul_ref,
        triton_routing=False,
    )


_TABLES: dict[str, Callable[[], KernelOps]] = {"triton": _triton, "torch": _torch}


def _rotary_triton(q, k, cos, sin):
    from moska.kernels.rotary import rotary_inplace

    rotary_inplace(q, k, cos, sin)  # in place on the projection's fresh output (or the norms')
    return q, k


def _rotary_ref(q, k, cos, sin):
    from moska.kernels.rotary import rotary_ref

    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)


def _paged_decode_torch(q, k_cache, v_cache, block_tables, seq_lens, sm_scale):
    from moska.kernels.paged_attention_torch import paged_attention_torch

    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    o, lse = paged_attention_torch(q, k_cache, v_cache, block_tables, cu, seq_lens, sm_scale)
    return o.to(q.dtype), lse


def _paged_prefill_torch(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale):
    from moska.kernels.paged_attention_torch import paged_attention_torch

    args = (q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale)
    o, lse = paged_attention_torch(*args)
    return o.to(q.dtype), lse
