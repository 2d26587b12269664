"""Decode attention over a per-KV-head page list (FlexiCache, `moska/flexicache/`).

The plain paged decode kernel (`paged_attention.py`) gives every KV head of a sequence the
same block table. FlexiCache keeps a different set of pages per head (a stable head: its
top-K pages plus the most recent ones; an unstable head: all of them), so this kernel reads
`head_tables[b, kv, :]` and `head_lens[b, kv]` instead: token n of head kv's list lives in
page `head_tables[b, kv, n // BLOCK_SIZE]` at slot `n % BLOCK_SIZE`. The listed pages are
all in the past of the query (decode), so no causal mask: every listed token is visible.

The page pool is either the engine's block cache [N, bs, Hkv, D] (head kv reads its own
slice of each block) or a compact per-head pool [N, bs, 1, D] whose pages each belong to one
head (FlexiCache's GPU buffer). With `slot_heads=True` over the block cache a table entry
is a (block, head) slot, `block * Hkv + head`: head kv may read a page stored in another
head's slice of a block (the engine's FlexiCache pool, carved out of the block cache, packs
each head's kept pages into any free slice). Split-KV along each head's own list, merged by
`merge_splits`, as in the plain kernel.
"""

import torch
import triton
import triton.language as tl

from .merge import merge_finish, merge_splits
from .qkv_checks import check_qkv

LOG2E = 1.4426950408889634
SPLIT_TOKENS = 1024  # CUDA: most tokens of one list a program reads (default splits)


@triton.jit
def _paged_heads_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [N, BLOCK_SIZE, Hc, D]
    v_ptr,
    bt_ptr,  # [B, Hkv, max_pages] int32
    lens_ptr,  # [B, Hkv] int32
    o_ptr,  # [S, B, Hq, D]
    lse_ptr,  # [S, B, Hq]
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,  # 0 for a per-head pool (Hc = 1)
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_bth,
    stride_os,
    stride_ls,
    Hkv,
    Hq,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SLOT_HEADS: tl.constexpr,  # table entries are block * Hkv + head slots
):
    b = tl.program_id(0) // Hkv
    kv = tl.program_id(0) % Hkv
    split = tl.program_id(1)
    n_tok = tl.load(lens_ptr + b * Hkv + kv)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < G
    head = kv * G + tl.minimum(offs_m, G - 1)
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    split_len = tl.cdiv(tl.cdiv(n_tok, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_tok)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb + kv * stride_bth
    k_base = k_ptr + (0 if SLOT_HEADS else kv * stride_kh)
    v_base = v_ptr + (0 if SLOT_HEADS else kv * stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = n % BLOCK_SIZE
        k_off = slot * stride_kt
        v_off = slot * stride_vt
        if SLOT_HEADS:
            k_off += (blk % Hkv) * stride_kh
            v_off += (blk % Hkv) * stride_vh
            blk = blk // Hkv
        k = tl.load(
            k_base + (blk * stride_kb + k_off)[None, :] + offs_d[:, None],
            mask=n_ok[None, :],
            other=0.0,
        )  # [D, BLOCK_N]
        v = tl.load(
            v_base + (blk * stride_vb + v_off)[:, None] + offs_d[None, :],
            mask=n_ok[:, None],
            other=0.0,
        )  # [BLOCK_N, D]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o, lse = merge_finish(m_i, l_i, acc)
    out = b.to(tl.int64) * Hq + head
    tl.store(
        o_ptr + split.to(tl.int64) * stride_os + out[:, None] * D + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + split.to(tl.int64) * stride_ls + out, lse, mask=row_ok)


def _check(q, k_pages, v_pages, head_tables, head_lens, slot_heads=False) -> tuple[int, int]:
    if q.dim() != 3 or k_pages.dim() != 4:
        raise ValueError(
            "q must be [B,Hq,D] and k_pages [N,block_size,Hkv or 1,D]; got "
            f"{tuple(q.shape)}, {tuple(k_pages.shape)}"
        )
    check_qkv(q, k_pages, v_pages, "k_pages", "v_pages")
    b, hq, _ = q.shape
    if head_tables.dtype != torch.int32 or head_tables.dim() != 3 or head_tables.stride(2) != 1:
        raise ValueError(f"head_tables must be int32 [B, Hkv, max_pages], got {head_tables.dtype}")
    hkv = head_tables.shape[1]
    if head_tables.shape[0] != b or hq % hkv or k_pages.shape[2] not in (1, hkv):
        raise ValueError(
            f"head_tables {tuple(head_tables.shape)} must be [B={b}, Hkv, P] with Hq={hq} a "
            f"multiple of Hkv and pages of Hkv or 1 heads (got {k_pages.shape[2]})"
        )
    if slot_heads and k_pages.shape[2] != hkv:
        raise ValueError(f"slot_heads reads a block cache of Hkv={hkv} heads per block")
    if head_lens.dtype != torch.int32 or head_lens.shape != (b, hkv):
        raise ValueError(f"head_lens must be int32 [{b}, {hkv}], got {tuple(head_lens.shape)}")
    bs = k_pages.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    return hkv, bs


def paged_decode_heads(
    q: torch.Tensor,  # [B, Hq, D]
    k_pages: torch.Tensor,  # [N, block_size, Hkv or 1, D]
    v_pages: torch.Tensor,
    head_tables: torch.Tensor,  # [B, Hkv, max_pages] int32
    head_lens: torch.Tensor,  # [B, Hkv] int32 tokens in each head's list
    sm_scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    slot_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over each KV head's own page list: (o [B,Hq,D], lse [B,Hq] fp32).

    A head whose list is empty gives o = 0, lse = -inf. No host sync. `slot_heads`: table
    entries are `block * Hkv + head` slots of the block cache (module docstring)."""
    hkv, bs = _check(q, k_pages, v_pages, head_tables, head_lens, slot_heads)
    b, hq, d = q.shape
    g = hq // hkv
    cuda = q.is_cuda
    max_tok = head_tables.shape[2] * bs
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if cuda else 2
        want = triton.cdiv(2 * sms, max(b * hkv, 1))
        if cuda:  # lists differ in length (FlexiCache: an unstable head reads every page, a
            # stable one a few): bound the longest list's share of one program, else its
            # program alone sets the kernel's time (B = 38: one split, 8K tokens each)
            want = max(want, triton.cdiv(max_tok, SPLIT_TOKENS))
        num_splits = max(1, min(want, max_tok // (128 if cuda else 64)))
    block_n = block_n or (128 if cuda else 32)
    o = torch.empty(num_splits, b, hq, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(num_splits, b, hq, device=q.device, dtype=torch.float32)
    if b == 0:
        return o[0].to(q.dtype), lse[0]
    stride_kh = k_pages.stride(2) if k_pages.shape[2] == hkv and hkv > 1 else 0
    stride_vh = v_pages.stride(2) if v_pages.shape[2] == hkv and hkv > 1 else 0
    # fmt: off
    _paged_heads_kernel[(b * hkv, num_splits)](
        q, k_pages, v_pages, head_tables, head_lens, o, lse,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), stride_kh,
        v_pages.stride(0), v_pages.stride(1), stride_vh,
        head_tables.stride(0), head_tables.stride(1), b * hq * d, b * hq, hkv, hq,
        sm_scale * LOG2E,
        G=g, D=d, BLOCK_SIZE=bs, BLOCK_M=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SLOT_HEADS=slot_heads,
        num_warps=num_warps or 4, num_stages=num_stages or (2 if cuda else 1),
    )
    # fmt: on
    o_m, lse_m = merge_splits(o.view(num_splits, b * hq, d), lse.view(num_splits, -1), q.dtype)
    return o_m.view(b, hq, d), lse_m.view(b, hq)


def paged_decode_heads_ref(
    q, k_pages, v_pages, head_tables, head_lens, sm_scale, *, slot_heads: bool = False
):
    """Plain-PyTorch reference of `paged_decode_heads`: (o [B,Hq,D] q.dtype, lse [B,Hq] fp32)."""
    hkv, bs = _check(q, k_pages, v_pages, head_tables, head_lens, slot_heads)
    b, hq, d = q.shape
    g = hq // hkv
    o = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    lens = head_lens.tolist()
    for i in range(b):
        for h in range(hkv):
            n = lens[i][h]
            if n == 0:
                continue
            pages = head_tables[i, h, : -(-n // bs)].long()
            slot: int | torch.Tensor = h if k_pages.shape[2] == hkv else 0
            if slot_heads:
                pages, slot = pages // hkv, pages % hkv
            k = k_pages[pages, :, slot].reshape(-1, d)[:n].float()  # [n, D]
            v = v_pages[pages, :, slot].reshape(-1, d)[:n].float()
            s = q[i, h * g : (h + 1) * g].float() @ k.T * sm_scale  # [G, n]
            lse[i, h * g : (h + 1) * g] = torch.logsumexp(s, -1)
            o[i, h * g : (h + 1) * g] = torch.softmax(s, -1) @ v
    return o.to(q.dtype), lse
