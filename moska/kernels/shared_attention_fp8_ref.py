"""Plain-PyTorch reference of the FP8 tensor-core program's algorithm (`fp8_mma`,
`shared_attention_fp8.py`): the same e4m3 cuts of q and of the weights, in the same key
blocks and online-softmax order, so the kernel can be checked against its own numerics
(tightly) and this against the dequantized library (`grouped_shared_attention_ref`, within
e4m3's error). For an unsplit launch (splits move the running max the weights are cut at).
"""

import torch

from .shared_inputs import chunk_table

Q_TARGET = 440.0  # a q row's largest magnitude maps here (448 is e4m3's max: see the kernel)
P_RANGE = 256.0  # a block's largest weight x V scale maps here before its e4m3 cut


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest e4m3 value (|x| <= 448), back in x's dtype."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def interpreter_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 -> fp32 as Triton's interpreter rounds (normal range): the mantissa is
    rounded half up and a carry out of it is OR-ed into the exponent, so a value just below
    a power of two with an odd exponent comes back halved (1.98 -> 1.0; the GPU gives 2.0)."""
    b = x.float().contiguous().view(torch.int32)
    exp = ((b >> 23) & 0xFF) - 127 + 7
    sig = b & 0x7FFFFF
    byte = (exp.clamp(1, 15) << 3) | ((sig >> 20) + ((sig >> 19) & 1))
    mag = torch.ldexp(1.0 + (byte & 7).float() / 8, ((byte >> 3) & 0xF) - 7)
    out = torch.where(b < 0, -mag, mag)
    return torch.where(exp < 1, x.float().to(torch.float8_e4m3fn).float(), out)  # subnormals


def cut_q(
    q: torch.Tensor, q_split: bool = False, cast=e4m3, residual_up: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q8 [.., D] as fp32 e4m3 values, q_s [.., 1]): q = q8 * q_s per row, to e4m3's
    precision; `q_split`: q8 holds q8_hi + q8_lo (the residual cut again, 2^-8), the residual
    cut `residual_up` times up (the kernel's QSPLIT_ACC: 1; its former form: 16)."""
    qf = q.float()
    q_s = qf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / Q_TARGET
    hi = cast(qf / q_s)
    if q_split:
        hi = hi + cast((qf / q_s - hi) * residual_up) / residual_up
    return hi, q_s


def fp8_mma_ref(
    q,
    k_pool,
    v_pool,
    chunk_offsets,
    sel,
    sm_scale,
    kv_scales,
    block_n,
    q_split=False,
    cast=e4m3,
    residual_up=1.0,
):
    """(o [N, G, D] fp32, lse [N, G] fp32) as the fp8_mma program computes them unsplit:
    scores (q8 . k8) * q_s * sm_scale * k_scale[token]; per block of `block_n` keys from
    the chunk's start, weights p = exp(s - running max) cut to e4m3 as p * v_scale * R /
    block max v_scale, the block's product scaled back by v_max / R. `cast`: the rounding
    to e4m3 (a test passes the Triton interpreter's own); `residual_up`: `cut_q`'s."""
    n = sel.req.numel()
    hq, d = q.shape[1], q.shape[2]
    g = hq // k_pool.shape[1]
    per_token = kv_scales[0].shape[0] == k_pool.shape[0]
    o = torch.zeros(n, g, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, g), float("-inf"), dtype=torch.float32, device=q.device)
    table = chunk_table(chunk_offsets)
    starts, ends = table.starts.tolist(), table.ends.tolist()
    for i, (r, h, c) in enumerate(zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist())):
        q8, q_s = cut_q(q[r, h * g : (h + 1) * g], q_split, cast, residual_up)  # [G, D], [G, 1]
        m = torch.full((g,), float("-inf"), device=q.device)
        l_sum = torch.zeros(g, device=q.device)
        acc = torch.zeros(g, d, device=q.device)
        for lo in range(starts[c], ends[c], block_n):
            hi = min(lo + block_n, ends[c])
            k8, v8 = k_pool[lo:hi, h].float(), v_pool[lo:hi, h].float()  # [L, D]
            if per_token:
                ks, vs = kv_scales[0][lo:hi, h], kv_scales[1][lo:hi, h]
            else:
                ks = kv_scales[0][c, h].expand(hi - lo)
                vs = torch.ones(hi - lo, device=q.device)
            s = (q8 @ k8.T) * q_s * sm_scale * ks[None, :]  # [G, L], natural log domain
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[:, None])
            alpha = torch.exp(m - m_new)
            l_sum = l_sum * alpha + p.sum(-1)
            v_max = vs.max().clamp_min(1e-30)
            pw = cast(p * (vs * (P_RANGE / v_max))[None, :])
            acc = acc * alpha[:, None] + (pw @ v8) * (v_max / P_RANGE)
            m = m_new
        if ends[c] > starts[c]:
            o[i] = acc / l_sum[:, None]
            lse[i] = m + torch.log(l_sum)
        if not per_token:
            o[i] = o[i] * kv_scales[1][c, h]
    return o, lse
