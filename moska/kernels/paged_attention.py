"""Paged attention over the unique (per-request) KV cache: decode and causal prefill.

One kernel serves both. A program owns one (sequence b, KV head, row tile, split): the
query rows of sequence b for the G query heads of that KV head, flattened as row =
j * G + g (query j, head g), so one K/V block read serves every head of the group and, in
prefill, every query of the tile. Query j of sequence b sits at position
`seq_lens[b] - q_len_b + j` and sees keys `0..position` (causal). Keys are gathered token
by token through the block table: token n lives in physical block
`block_tables[b, n // BLOCK_SIZE]` at slot `n % BLOCK_SIZE`.

Decode splits the context along the sequence (split-KV) so that a single long request
still fills the GPU; each split writes a partial state and `merge_splits` combines them.
The grid fixes the number of splits; each sequence cuts its own context (read on the
device) into that many parts, so a short context in a CUDA graph sized for the longest
one still spreads over many programs instead of leaving all but the first split empty.
"""

import torch
import triton
import triton.language as tl

from .merge import merge_finish, merge_splits
from .paged_inputs import check_inputs, outputs

LOG2E = 1.4426950408889634


@triton.jit
def _paged_attn_inner(
    acc,
    m_i,
    l_i,
    q,  # [BLOCK_M, D] fp32, [BLOCK_M], [BLOCK_M], [BLOCK_M, D]
    k_base,
    v_base,  # k_cache / v_cache + kv_head * stride_h
    bt_ptr,  # [max_blocks] int32 block table row of this sequence
    pos,  # [BLOCK_M] int32 position of each query row
    lo,
    hi,
    qk_scale,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    D: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Online softmax over keys [lo, hi) in blocks of BLOCK_N; scores in the log2 domain.
    # Unmasked calls need every key of [lo, hi) visible to every row and full blocks.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        if MASKED:
            n_ok = n < hi
            blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_ptr + n // BLOCK_SIZE).to(tl.int64)
        slot = n % BLOCK_SIZE
        k_ptrs = (
            k_base + (blk * stride_kb + slot * stride_kt)[None, :] + offs_d[:, None]
        )  # [D, BLOCK_N]
        v_ptrs = (
            v_base + (blk * stride_vb + slot * stride_vt)[:, None] + offs_d[None, :]
        )  # [BLOCK_N, D]
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            s = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see no key here
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    bt_ptr,  # [B, max_blocks] int32
    cu_q_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    o_ptr,  # [S, T, Hq, D] (S = 1: the output itself; else fp32 partials)
    lse_ptr,  # [S, T, Hq] fp32
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
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
):
    tile = tl.program_id(0)
    b = tl.program_id(1) // Hkv
    kv = tl.program_id(1) % Hkv
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    if tile * BLOCK_M < q_len * G:
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        rows = tile * BLOCK_M + offs_m
        row_ok = rows < q_len * G
        j = tl.minimum(rows // G, q_len - 1)
        t = (q_start + j).to(tl.int64)
        head = kv * G + rows % G
        pos = seq_len - q_len + j  # [BLOCK_M]
        q = tl.load(
            q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        # this sequence's own split length: its context (not the table width, which in a
        # CUDA graph is the longest context the model allows) cut into the grid's splits
        split_len = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = split * split_len
        hi = tl.minimum(tl.minimum(lo + split_len, seq_len), tl.max(pos, 0) + 1)
        full_hi = tl.minimum(hi, tl.min(pos, 0) + 1)
        full_hi = lo + (tl.maximum(full_hi - lo, 0) // BLOCK_N) * BLOCK_N
        k_base = k_ptr + kv * stride_kh
        v_base = v_ptr + kv * stride_vh
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        acc, m_i, l_i = _paged_attn_inner(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            bt_row,
            pos,
            lo,
            full_hi,
            qk_scale,
            stride_kb,
            stride_kt,
            stride_vb,
            stride_vt,
            BLOCK_N,
            BLOCK_SIZE,
            D,
            False,
            PRECISION,
        )
        acc, m_i, l_i = _paged_attn_inner(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            bt_row,
            pos,
            tl.maximum(full_hi, lo),
            hi,
            qk_scale,
            stride_kb,
            stride_kt,
            stride_vb,
            stride_vt,
            BLOCK_N,
            BLOCK_SIZE,
            D,
            True,
            PRECISION,
        )
        o, lse = merge_finish(m_i, l_i, acc)
        out = t * Hq + head  # [BLOCK_M] row of [T * Hq]
        tl.store(
            o_ptr + split.to(tl.int64) * stride_os + out[:, None] * D + offs_d[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + out, lse, mask=row_ok)


def _launch(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    seq_lens,
    sm_scale,
    max_q_len,
    num_splits,
    block_m,
    block_n,
    num_warps,
    num_stages,
    out,
):
    t_total, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    b = block_tables.shape[0]
    g = hq // hkv
    max_ctx = block_tables.shape[1] * bs
    split_len = triton.cdiv(triton.cdiv(max(max_ctx, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_ctx, split_len))
    o_out, lse_out = outputs(out, t_total, hq, d, q.dtype, q.device)
    if num_splits == 1:
        o, lse = o_out, lse_out
    else:
        o = torch.empty(num_splits, t_total, hq, d, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_splits, t_total, hq, device=q.device, dtype=torch.float32)
    if t_total == 0 or b == 0:
        return o_out, lse_out
    grid = (triton.cdiv(max_q_len * g, block_m), b * hkv, num_splits)
    # fmt: off
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, o, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), t_total * hq * d, t_total * hq, hkv, hq,
        sm_scale * LOG2E,
        G=g, D=d, BLOCK_SIZE=bs, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    # fmt: on
    if num_splits == 1:
        return o, lse
    merge_splits(
        o.view(num_splits, t_total * hq, d),
        lse.view(num_splits, -1),
        q.dtype,
        out=(o_out.view(t_total * hq, d), lse_out.view(t_total * hq)),
    )
    return o_out, lse_out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    sm_scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over its whole context: (o [B,Hq,D] q.dtype, lse [B,Hq] fp32).

    No host sync. The context is split along the sequence into `num_splits` parts (by
    default enough for B * Hkv * splits to cover two programs per SM, each split >= 128
    tokens of the table width); each sequence cuts its own context into that many parts,
    and the splits are merged exactly by `merge_splits`.
    """
    check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    b, hq, _ = q.shape
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for B={b} queries")
    g = hq // k_cache.shape[2]
    cuda = q.is_cuda
    if num_splits is None:
        max_ctx = block_tables.shape[1] * k_cache.shape[1]
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if cuda else 2
        want = triton.cdiv(2 * sms, max(b * k_cache.shape[2], 1))
        num_splits = max(1, min(want, max_ctx // (128 if cuda else 64)))
    # Measured on H200 at 128K context (bench/results/kernels.json): 128-token blocks with
    # many splits (B=1: 33 splits) and with few (B=8: 5 splits: 1.00 ms vs 1.08 ms with 64
    # in this session's run, 1.02 vs 1.09 in the one before).
    block_n = block_n or (128 if cuda else 32)
    cu_q_lens = torch.arange(b + 1, device=q.device, dtype=torch.int32)
    return _launch(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        seq_lens,
        sm_scale,
        1,
        num_splits,
        max(16, triton.next_power_of_2(g)),
        block_n,
        num_warps or 4,
        num_stages or (2 if cuda else 1),
        out,
    )


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D] packed queries of B sequences
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_q_lens: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new queries
    sm_scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of packed queries over paged KV: (o [T,Hq,D] q.dtype, lse [T,Hq] fp32).

    Query j of sequence b sits at position seq_lens[b] - q_len_b + j. One host sync
    (the longest query length, which sizes the grid).
    """
    check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    b = block_tables.shape[0]
    if cu_q_lens.dtype != torch.int32 or cu_q_lens.shape != (b + 1,):
        raise ValueError(
            f"cu_q_lens must be int32 [B+1]={b + 1}, got {cu_q_lens.dtype} {tuple(cu_q_lens.shape)}"
        )
    max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max()) if b else 0
    cuda = q.is_cuda
    return _launch(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        seq_lens,
        sm_scale,
        max(max_q_len, 1),
        1,
        block_m or (128 if cuda else 64),
        block_n or (64 if cuda else 32),
        num_warps or (8 if cuda else 4),
        num_stages or (3 if cuda else 1),
        out,
    )


def paged_attention_ref(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale):
    """Plain-PyTorch causal reference over paged KV (decode: cu_q_lens = arange(B+1)); fp32 results."""
    t_total, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    o = torch.zeros(t_total, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t_total, hq), float("-inf"), dtype=torch.float32, device=q.device)
    cu = cu_q_lens.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        n_blk = triton.cdiv(seq_len, bs)
        blocks = block_tables[b, :n_blk].long()
        k = (
            k_cache[blocks].reshape(-1, hkv, d)[:seq_len].float().repeat_interleave(g, 1)
        )  # [L, Hq, D]
        v = v_cache[blocks].reshape(-1, hkv, d)[:seq_len].float().repeat_interleave(g, 1)
        qb = q[cu[b] : cu[b + 1]].float()  # [q_len, Hq, D]
        s = torch.einsum("qhd,khd->hqk", qb, k) * sm_scale  # [Hq, q_len, L]
        pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        s = s.masked_fill(
            torch.arange(seq_len, device=q.device)[None, :] > pos[:, None], float("-inf")
        )
        lse[cu[b] : cu[b + 1]] = torch.logsumexp(s, -1).T
        o[cu[b] : cu[b + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return o, lse
