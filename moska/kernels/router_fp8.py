"""Key-max scores on FP8 tensor cores: the default router's launch for an e4m3 routing index.

The key-max score of (request, KV head, chunk) is the largest logit of the request's G query
heads of that KV head over the chunk's low-rank keys (``router_dense.py``). Its cost is
arithmetic, 2 x B x Hq x S x r FLOPs per layer (a third of an 8B-dims decode step at B =
256 with a 512K-token library), so an FP8 library that reads its chunks at half the bytes
keeps paying the router in full. Here the low-rank keys are e4m3 with one scale per
(chunk, KV head), and the queries' low-rank rows are e4m3 with one scale per (request,
query head); the products run on FP8 tensor cores with fp32 (or fp16) accumulation, and
because every scale is positive the maximum commutes with them:

    max_n (s_q q8 . s_k k8_n) = s_q s_k max_n (q8 . k8_n)

so the running maximum is taken on raw products and scaled once per row at the end.

fp16 accumulation (``F16_ACC``: packed maxima, as the fp16 kernel) needs |q8 . k8| below
fp16's 65,504: the query rows are cut with their L2 norm at ``Q_NORM`` (16), so the
logit is at most 16 x ||k8||_2 <= 16 x sqrt(r) x 448 (40,544 at r = 32, 57,337 at r = 64).

Reference: ``keymax_fp8_ref`` (the same e4m3 values dequantized, fp32 products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .router_dense import project_queries
from .router_ref import keymax_scores_ref
from .router_rows import _dense_item
from .runtime import triton_runs_on

E4M3_MAX = 448.0
Q_NORM = 16.0  # the L2 norm of a query row after its cut (fp16 accumulation headroom)


def quantize_lowrank_keys(
    lowrank_keys: torch.Tensor, chunk_offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, Hkv, r] low-rank keys -> (e4m3 keys [S, Hkv, r], scale [C, Hkv] fp32): one scale
    per (chunk, KV head), the chunk's largest |value| mapped to 448."""
    offs = chunk_offsets.to(torch.int64)
    lens = offs[1:] - offs[:-1]
    c = lens.numel()
    x = lowrank_keys.float()
    chunk = torch.repeat_interleave(torch.arange(c, device=x.device), lens.to(x.device))
    amax = torch.zeros(c, x.shape[1], device=x.device)
    amax.scatter_reduce_(0, chunk[:, None].expand(-1, x.shape[1]), x.abs().amax(-1), "amax")
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    keys = (x / scale[chunk][:, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return keys.to(torch.float8_e4m3fn), scale


def project_queries_fp8(q: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] onto each KV head's basis [Hkv, D, r] -> (e4m3 rows [B, Hq, r], scale
    [B, Hq] fp32), each row cut with its L2 norm at ``Q_NORM`` (see the module docstring)."""
    qr = project_queries(q, basis, torch.float32, use_triton=False)  # the same einsum
    norm = qr.norm(dim=-1)
    scale = torch.where(norm > 0, norm / Q_NORM, torch.ones_like(norm))
    return (qr / scale[..., None]).to(torch.float8_e4m3fn), scale


def keymax_fp8_ref(q8, q_scale, keys8, k_scale, chunk_offsets) -> torch.Tensor:
    """The scores of the dequantized e4m3 rows and keys, fp32: [B, Hkv, C]."""
    qr = q8.float() * q_scale[..., None]
    offs = chunk_offsets.to(torch.int64)
    lens = offs[1:] - offs[:-1]
    chunk = torch.repeat_interleave(torch.arange(lens.numel(), device=keys8.device), lens)
    keys = keys8.float() * k_scale[chunk][:, :, None]
    r = qr.shape[-1]
    identity = torch.eye(r, device=qr.device).expand(keys.shape[1], r, r)
    return keymax_scores_ref(qr, identity.contiguous(), keys, chunk_offsets)


# fmt: off
@triton.jit
def _keymax_fp8_kernel(
    q_ptr,  # [B, Hq, R] e4m3
    qs_ptr,  # [B, Hq] fp32
    lk_ptr,  # [S_total, Hkv, R] e4m3
    ks_ptr,  # [C, Hkv] fp32
    offsets_ptr,  # [C + 1] int32
    out_ptr,  # [B, Hkv, C] fp32
    B, C, Hkv, G, R, TPC,
    stride_qb, stride_qh, stride_sb, stride_ks, stride_kh, stride_ob, stride_oh,
    F16_ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    # Items (tile t, head h) as the fp16 kernel's (`_dense_item`); a smaller grid loops
    T = C * TPC
    offs_g = tl.arange(0, BLOCK_G)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    acc_dtype = tl.float16 if F16_ACC else tl.float32
    for w in range(tl.program_id(0), T * Hkv, tl.num_programs(0)):
        h, chunk, req, req_ok, lo, hi = _dense_item(w, T, TPC, B, offsets_ptr, BLOCK_B)
        head = h * G + offs_g
        row_ok = req_ok[:, None] & (offs_g < G)[None, :]
        q_ptrs = (q_ptr + req[:, None, None].to(tl.int64) * stride_qb
                  + head[None, :, None] * stride_qh + offs_r[None, None, :])  # fmt: skip
        q = tl.load(q_ptrs, mask=row_ok[:, :, None] & (offs_r < R)[None, None, :], other=0.0)
        q = tl.reshape(q, (BLOCK_B * BLOCK_G, BLOCK_R))
        best = tl.full((BLOCK_B * BLOCK_G, BLOCK_N), float("-inf"), acc_dtype)
        lk_ptrs = (lk_ptr + lo.to(tl.int64) * stride_ks + h * stride_kh
                   + offs_n[None, :] * stride_ks + offs_r[:, None])  # fmt: skip
        full_hi = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for _ in range(lo, full_hi, BLOCK_N):
            lk = tl.load(lk_ptrs, mask=(offs_r < R)[:, None], other=0.0)
            best = tl.maximum(best, tl.dot(q, lk, out_dtype=acc_dtype))
            lk_ptrs += BLOCK_N * stride_ks
        if full_hi < hi:
            key_ok = (full_hi + offs_n) < hi
            lk = tl.load(lk_ptrs, mask=key_ok[None, :] & (offs_r < R)[:, None], other=0.0)
            s = tl.dot(q, lk, out_dtype=acc_dtype)
            best = tl.maximum(best, tl.where(key_ok[None, :], s, float("-inf")))
        raw = tl.reshape(tl.max(best.to(tl.float32), axis=1), (BLOCK_B, BLOCK_G))
        qs = tl.load(qs_ptr + req[:, None].to(tl.int64) * stride_sb + head[None, :],
                     mask=row_ok, other=1.0)  # fmt: skip
        score = tl.max(tl.where(row_ok, raw * qs, float("-inf")), axis=1)
        score = score * tl.load(ks_ptr + chunk * Hkv + h)
        o_ptrs = out_ptr + req.to(tl.int64) * stride_ob + h * stride_oh + chunk
        tl.store(o_ptrs, score, mask=req_ok)


def keymax_fp8_scores(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    keys8: torch.Tensor,
    k_scale: torch.Tensor,
    chunk_offsets: torch.Tensor,
    *,
    block_b: int = 32,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
    f16_acc: bool = True,
    max_programs: int | None = None,
    use_triton: bool = True,
) -> torch.Tensor:
    """Key-max scores from e4m3 query rows [B, Hq, r] (+ scale [B, Hq]) and e4m3 low-rank
    keys [S, Hkv, r] (+ scale [C, Hkv]): [B, Hkv, C] fp32, one launch."""
    if q8.dtype != torch.float8_e4m3fn or keys8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q8 and keys8 must be float8_e4m3fn, got {q8.dtype}, {keys8.dtype}")
    b, hq, r = q8.shape
    _, hkv, rk = keys8.shape
    c = chunk_offsets.numel() - 1
    if rk != r or hq % hkv or q_scale.shape != (b, hq) or k_scale.shape != (c, hkv):
        raise ValueError(
            f"shapes disagree: q8 {tuple(q8.shape)}, q_scale {tuple(q_scale.shape)}, keys8 "
            f"{tuple(keys8.shape)}, k_scale {tuple(k_scale.shape)}, {c} chunks"
        )
    if not use_triton or not triton_runs_on(q8.device, _keymax_fp8_kernel):
        return keymax_fp8_ref(q8, q_scale, keys8, k_scale, chunk_offsets)
    g = hq // hkv
    out = torch.empty(b, hkv, c, dtype=torch.float32, device=q8.device)
    if b == 0 or c == 0:
        return out
    q8, q_scale, keys8 = q8.contiguous(), q_scale.float().contiguous(), keys8.contiguous()
    k_scale = k_scale.float().contiguous()
    block_g = triton.next_power_of_2(g)
    block_b = max(min(triton.next_power_of_2(block_b), triton.next_power_of_2(b)), 16 // block_g, 1)
    tpc = triton.cdiv(b, block_b)
    items = c * tpc * hkv
    grid = (items if max_programs is None else max(1, min(items, max_programs)),)
    # fmt: off
    _keymax_fp8_kernel[grid](
        q8, q_scale, keys8, k_scale, chunk_offsets, out, b, c, hkv, g, r, tpc,
        q8.stride(0), q8.stride(1), q_scale.stride(0), keys8.stride(0), keys8.stride(1),
        out.stride(0), out.stride(1), F16_ACC=f16_acc, BLOCK_B=block_b, BLOCK_G=block_g,
        BLOCK_R=max(32, triton.next_power_of_2(r)), BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    # fmt: on
    return out
