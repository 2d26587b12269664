"""Exact log-sum-exp merges of partial attention states.

An attention state over a key set is (o, lse): o the softmax-weighted mean of the values,
lse the log of the softmax denominator. Two states over disjoint key sets merge exactly:

    lse = log(exp(lse_a) + exp(lse_b)),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.

The state of an empty key set is (0, -inf); merging it changes nothing, and merging only
empty states gives (0, -inf) again, never NaN. All arithmetic is fp32 in base 2.

Three kernels, each an online merge that keeps a running max `m`, a running denominator
`l` and a running numerator `acc`:

- ``merge_states``: two states of the same shape.
- ``merge_splits``: S partial states of the same rows (split-KV partials).
- ``merge_selections``: each row's base state with every selection of that row
  (the shared-chunk results of grouped shared attention).
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _merge_step(m_i, l_i, acc, lse2, o):
    # One online-merge step. m_i, l_i, lse2: [R] fp32 (log2 domain); acc, o: [R, D] fp32.
    m_new = tl.maximum(m_i, lse2)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    w = tl.math.exp2(lse2 - m_sub)
    acc = acc * alpha[:, None] + w[:, None] * o
    l_i = l_i * alpha + w
    return m_new, l_i, acc


@triton.jit
def merge_finish(m_i, l_i, acc):
    # Returns (o [R, D], lse [R]) in natural log from a running state whose max m_i is in
    # the log2 domain; an empty state gives (0, -inf). Shared by every attention kernel.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    return o, lse


@triton.jit
def _load_state(o_ptr, lse_ptr, rows, row_ok, offs_d, stride_o):
    # o_ptr rows [R, D] with row stride stride_o; lse_ptr [R]. Returns log2-domain lse.
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    ok = row_ok & (lse != float("-inf"))
    o = tl.load(o_ptr + rows[:, None] * stride_o + offs_d[None, :], mask=ok[:, None], other=0.0)
    return o.to(tl.float32), lse * 1.4426950408889634


@triton.jit
def _merge_states_kernel(
    o_a_ptr,  # [R, D]
    lse_a_ptr,  # [R] fp32
    o_b_ptr,  # [R, D]
    lse_b_ptr,  # [R] fp32
    o_ptr,  # [R, D]
    lse_ptr,  # [R] fp32
    R,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    o, lse2 = _load_state(o_a_ptr, lse_a_ptr, rows, row_ok, offs_d, D)
    m_i, l_i, acc = _merge_step(m_i, l_i, acc, lse2, o)
    o, lse2 = _load_state(o_b_ptr, lse_b_ptr, rows, row_ok, offs_d, D)
    m_i, l_i, acc = _merge_step(m_i, l_i, acc, lse2, o)
    o, lse = merge_finish(m_i, l_i, acc)
    tl.store(
        o_ptr + rows[:, None] * D + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    o_part_ptr,  # [S, R, D] fp32
    lse_part_ptr,  # [S, R] fp32
    o_ptr,  # [R, D]
    lse_ptr,  # [R] fp32
    R,
    S,
    stride_os,  # = R * D, passed as int64 when large
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # BLOCK_S splits of BLOCK_R rows are loaded at once ([BLOCK_S, BLOCK_R, D]) and merged
    # in one step, so a decode step's 30-odd splits cost a few rounds of loads, not 30 in
    # a row (a CUDA-graph decode at B = 1 spent 12 us per layer here with a serial loop).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_S)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        ok = (s < S)[:, None] & row_ok[None, :]  # [BLOCK_S, BLOCK_R]
        lse2 = tl.load(lse_part_ptr + s[:, None] * R + rows[None, :], mask=ok, other=float("-inf"))
        lse2 = lse2 * 1.4426950408889634
        live = ok & (lse2 != float("-inf"))  # an empty partial's o is never read
        o = tl.load(
            o_part_ptr
            + s[:, None, None] * stride_os
            + rows[None, :, None] * D
            + offs_d[None, None, :],
            mask=live[:, :, None],
            other=0.0,
        )
        m_new = tl.maximum(m_i, tl.max(lse2, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        w = tl.math.exp2(lse2 - m_sub[None, :])  # [BLOCK_S, BLOCK_R]; 0 for empty partials
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new
    o, lse = merge_finish(m_i, l_i, acc)
    tl.store(
        o_ptr + rows[:, None] * D + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _merge_selections_kernel(
    o_base_ptr,  # [B, Hq, D]
    lse_base_ptr,  # [B, Hq] fp32
    o_sel_ptr,  # [N, G, D]
    lse_sel_ptr,  # [N, G] fp32
    order_ptr,  # [N] int32/int64: selection indices grouped by (req, kv_head)
    seg_ptr,  # [B * Hkv + 1] int32/int64: segment of each (req, kv_head) in order
    o_ptr,  # [B, Hq, D]
    lse_ptr,  # [B, Hq] fp32
    Hq,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)  # = req * Hkv + kv_head
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    base_rows = pid * G + offs_g  # rows of [B * Hq] since Hq = Hkv * G
    o, lse2 = _load_state(o_base_ptr, lse_base_ptr, base_rows, g_ok, offs_d, D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    m_i, l_i, acc = _merge_step(m_i, l_i, acc, lse2, o)
    lo = tl.load(seg_ptr + pid)
    hi = tl.load(seg_ptr + pid + 1)
    for i in range(lo, hi):
        s = tl.load(order_ptr + i)
        o, lse2 = _load_state(o_sel_ptr, lse_sel_ptr, s * G + offs_g, g_ok, offs_d, D)
        m_i, l_i, acc = _merge_step(m_i, l_i, acc, lse2, o)
    o, lse = merge_finish(m_i, l_i, acc)
    out_rows = pid * G + offs_g
    tl.store(
        o_ptr + out_rows[:, None] * D + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=g_ok[:, None],
    )
    tl.store(lse_ptr + out_rows, lse, mask=g_ok)


def _check_state(name: str, o: torch.Tensor, lse: torch.Tensor) -> None:
    if lse.dtype != torch.float32:
        raise ValueError(f"{name}: lse must be float32, got {lse.dtype}")
    if o.shape[:-1] != lse.shape:
        raise ValueError(f"{name}: o {tuple(o.shape)} and lse {tuple(lse.shape)} disagree")
    if o.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: o must be fp16, bf16 or fp32, got {o.dtype}")
    d = o.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"{name}: head_dim must be a power of two >= 16, got {d}")


def merge_states(
    o_a: torch.Tensor,  # [..., D]
    lse_a: torch.Tensor,  # [...] fp32
    o_b: torch.Tensor,  # [..., D]
    lse_b: torch.Tensor,  # [...] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two attention states over disjoint key sets.

    Returns (o [..., D] o_a.dtype, lse fp32)."""
    _check_state("merge_states a", o_a, lse_a)
    _check_state("merge_states b", o_b, lse_b)
    if o_a.shape != o_b.shape:
        raise ValueError(f"merge_states: shapes differ, {tuple(o_a.shape)} vs {tuple(o_b.shape)}")
    d = o_a.shape[-1]
    o_a2, o_b2 = o_a.reshape(-1, d).contiguous(), o_b.reshape(-1, d).contiguous()
    lse_a2, lse_b2 = lse_a.reshape(-1).contiguous(), lse_b.reshape(-1).contiguous()
    rows = o_a2.shape[0]
    o = torch.empty_like(o_a2)
    lse = torch.empty(rows, device=o.device, dtype=torch.float32)
    if rows:
        block_r = 32
        _merge_states_kernel[(triton.cdiv(rows, block_r),)](
            o_a2, lse_a2, o_b2, lse_b2, o, lse, rows, D=d, BLOCK_R=block_r
        )
    return o.view(o_a.shape), lse.view(lse_a.shape)


def merge_splits(
    o_part: torch.Tensor,  # [S, R, D] fp32
    lse_part: torch.Tensor,  # [S, R] fp32
    out_dtype: torch.dtype,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges S split-KV partial states of R rows into (o [R, D] out_dtype, lse [R] fp32).

    `out` = (o [R, D], lse [R]) contiguous views to write into, optional.
    """
    if o_part.dim() != 3 or lse_part.shape != o_part.shape[:2]:
        raise ValueError(
            "merge_splits: need o [S,R,D], lse [S,R]; got "
            f"{tuple(o_part.shape)}, {tuple(lse_part.shape)}"
        )
    _check_state("merge_splits", o_part, lse_part)
    s, rows, d = o_part.shape
    o_part, lse_part = o_part.contiguous(), lse_part.contiguous()
    if out is None:
        o = torch.empty(rows, d, device=o_part.device, dtype=out_dtype)
        lse = torch.empty(rows, device=o_part.device, dtype=torch.float32)
    else:
        o, lse = out
        if (
            o.shape != (rows, d)
            or lse.shape != (rows,)
            or not (o.is_contiguous() and lse.is_contiguous())
        ):
            raise ValueError(f"merge_splits: out must be contiguous [R,D]=({rows},{d}) and [R]")
    if rows and s:
        # On the GPU one row per single-warp program: the splits of a load round sit in
        # each thread's registers, so the merge over them needs no cross-warp reduction
        # (a 3-split merge of 16 rows per 4-warp program took twice as long). The
        # interpreter, whose cost is per program, gets few large programs.
        cuda = o_part.is_cuda
        block_s = min(triton.next_power_of_2(s), 16 if cuda else 32)
        block_r = 1 if cuda else 64
        _merge_splits_kernel[(triton.cdiv(rows, block_r),)](
            o_part, lse_part, o, lse, rows, s, rows * d, D=d, BLOCK_R=block_r,
            BLOCK_S=block_s, num_warps=1 if cuda else 4,
        )  # fmt: skip
    return o, lse


def merge_selections(
    o_base: torch.Tensor,  # [B, Hq, D]
    lse_base: torch.Tensor,  # [B, Hq] fp32
    o_sel: torch.Tensor,  # [N, G, D]
    lse_sel: torch.Tensor,  # [N, G] fp32
    sel,  # Selections: req, kv_head, chunk [N] int32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges each row's base state with all its selections; returns (o [B,Hq,D], lse [B,Hq])."""
    _check_state("merge_selections base", o_base, lse_base)
    _check_state("merge_selections sel", o_sel, lse_sel)
    if o_base.dim() != 3 or o_sel.dim() != 3:
        raise ValueError("merge_selections: o_base must be [B,Hq,D] and o_sel [N,G,D]")
    b, hq, d = o_base.shape
    n, g, d_sel = o_sel.shape
    if d_sel != d or g == 0 or hq % g:
        raise ValueError(
            f"merge_selections: o_sel {tuple(o_sel.shape)} does not fit "
            f"o_base {tuple(o_base.shape)}"
        )
    if sel.req.shape != (n,) or sel.kv_head.shape != (n,):
        raise ValueError(
            f"merge_selections: sel must have [N]={n} entries, got {tuple(sel.req.shape)}"
        )
    hkv = hq // g
    if sel.row_order is not None and sel.row_offsets is not None:
        order, seg = sel.row_order, sel.row_offsets  # from the router: no sort needed
        if seg.shape != (b * hkv + 1,):
            raise ValueError(f"merge_selections: row_offsets must be [B*Hkv+1]={b * hkv + 1}")
    else:
        key = sel.req.long() * hkv + sel.kv_head.long()  # [N]
        key_sorted, order = torch.sort(key, stable=True)
        seg = torch.searchsorted(key_sorted, torch.arange(b * hkv + 1, device=key.device))
    o = torch.empty_like(o_base, memory_format=torch.contiguous_format)
    lse = torch.empty(b, hq, device=o_base.device, dtype=torch.float32)
    if b * hkv:
        _merge_selections_kernel[(b * hkv,)](
            o_base.contiguous(),
            lse_base.contiguous(),
            o_sel.contiguous(),
            lse_sel.contiguous(),
            order,
            seg,
            o,
            lse,
            hq,
            G=g,
            D=d,
            BLOCK_G=max(2, triton.next_power_of_2(g)),
        )
    return o, lse


def merge_states_ref(o_a, lse_a, o_b, lse_b):
    """Plain-PyTorch reference of merge_states (fp32 result)."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a.float() - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b.float() - safe).unsqueeze(-1)
    o = w_a * torch.nan_to_num(o_a.float()) + w_b * torch.nan_to_num(o_b.float())
    return o, lse


def merge_selections_ref(o_base, lse_base, o_sel, lse_sel, sel):
    """Plain-PyTorch reference of merge_selections: one merge per selection (fp32 result)."""
    _b, _hq, _d = o_base.shape
    g = o_sel.shape[1]
    o, lse = o_base.float().clone(), lse_base.float().clone()
    for i in range(sel.req.numel()):
        r, h = int(sel.req[i]), int(sel.kv_head[i])
        heads = slice(h * g, (h + 1) * g)
        o[r, heads], lse[r, heads] = merge_states_ref(
            o[r, heads], lse[r, heads], o_sel[i], lse_sel[i]
        )
    return o, lse
