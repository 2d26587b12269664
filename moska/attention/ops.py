"""Which implementation of each attention kernel a run uses: Triton kernels on CUDA, their
plain-PyTorch references on CPU (or when asked). One table, chosen once per engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class AttentionOps(NamedTuple):
    name: str
    paged_decode: Callable
    paged_prefill: Callable
    grouped_shared: Callable
    merge_selections: Callable
    kv_write: Callable  # (k, v, k_cache, v_cache, slot_mapping): new K/V into the cache
    use_triton: bool


def get_attention_ops(kind: str) -> AttentionOps:
    """kind: "triton" or "torch"."""
    from moska.kernels import kv_write, merge, paged_attention, shared_attention

    if kind == "triton":
        return AttentionOps(
            name="triton",
            paged_decode=paged_attention.paged_decode_attention,
            paged_prefill=paged_attention.paged_prefill_attention,
            grouped_shared=shared_attention.grouped_shared_attention,
            merge_selections=merge.merge_selections,
            kv_write=kv_write.kv_write,
            use_triton=True,
        )
    if kind == "torch":
        return AttentionOps(
            name="torch",
            paged_decode=_paged_decode_ref,
            paged_prefill=_paged_prefill_ref,
            grouped_shared=shared_attention.grouped_shared_attention_ref,
            merge_selections=merge.merge_selections_ref,
            kv_write=kv_write.kv_write_ref,
            use_triton=False,
        )
    raise ValueError(f"unknown attention implementation {kind!r}; use 'triton' or 'torch'")


def _paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, sm_scale):
    import torch

    from moska.kernels.paged_attention import paged_attention_ref

    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    o, lse = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, sm_scale)
    return o.to(q.dtype), lse


def _paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale):
    from moska.kernels.paged_attention import paged_attention_ref

    o, lse = paged_attention_ref(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale)
    return o.to(q.dtype), lse
