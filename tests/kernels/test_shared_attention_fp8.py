"""The FP8 tensor-core program of grouped shared attention (`fp8_mma`,
moska/kernels/shared_attention_fp8.py) against the plain-PyTorch reference on the
dequantized e4m3 library (q in e4m3 per row and the weights in e4m3 add the error of e4m3
itself: 2^-4 relative per element)."""

import os

import pytest
import torch
from kernel_util import rel_err

from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.library.fp8 import quantize

# small tiles and splits: row tiles that end inside a request, a masked tail block, split-KV
SMALL = {"block_m": 16, "block_n": 32, "target_programs": 6, "min_split": 32}
TOL_O = 0.08  # q and the weights cut to e4m3 (the interpreter rounds e4m3 ties up); lse a tenth

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CPU = pytest.mark.skipif(not _INTERPRET, reason="compiled Triton reads CUDA tensors only")
_CUDA = pytest.mark.skipif(
    _INTERPRET or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0; bf16 is wrong interpreted)",
)


def _inputs(device, dtype, lens=(1, 70, 150, 35), b=4, hkv=2, g=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = sum(lens)
    q = torch.randn(b, hkv * g, d, generator=gen).to(device, dtype)
    # per-token scales of a range (x4 on keys, x40 on values)
    k = torch.randn(s, hkv, d, generator=gen) * (0.2 + 0.6 * torch.rand(s, 1, 1, generator=gen))
    v = torch.randn(s, hkv, d, generator=gen) * (0.1 + 4 * torch.rand(s, 1, 1, generator=gen))
    offs = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t = sorted(
        (c, h, r)
        for c in range(len(lens))
        for h in range(hkv)
        for r in range(b)
        if torch.rand((), generator=gen) < 0.7
    )
    tt = torch.tensor(t, dtype=torch.int32)
    sel = Selections(*(x.contiguous().to(device) for x in (tt[:, 2], tt[:, 1], tt[:, 0])))
    return q, k.to(device, dtype), v.to(device, dtype), offs.to(device), sel


CASES = [
    pytest.param(dev, dt, gran, vt, marks=mark, id=f"{dev}-{gran}{'-vt' if vt else ''}")
    for dev, dt, mark in (("cpu", torch.float16, _CPU), ("cuda", torch.bfloat16, _CUDA))
    for gran, vt in (("token", False), ("chunk", False), ("token", True))
]


@pytest.mark.parametrize("device,dtype,granularity,v_t", CASES)
def test_fp8_mma_matches_dequantized_reference(device, dtype, granularity, v_t):
    # token-major V (TMA along tokens): chunks start at multiples of 16 rows
    q, k, v, offs, sel = _inputs(device, dtype, lens=(16, 80, 128, 32) if v_t else (1, 70, 150, 35))
    kq, vq = quantize(k, offs, granularity), quantize(v, offs, granularity)
    scales, sc = (kq.scale, vq.scale), q.shape[-1] ** -0.5
    n, g, d = sel.req.numel(), q.shape[1] // k.shape[1], q.shape[2]
    out = (
        torch.full((n, g, d), float("nan"), dtype=q.dtype, device=device),
        torch.full((n, g), float("nan"), device=device),
    )  # poison: every element must be written
    extra = {"v_pool_t": vq.data.permute(1, 2, 0).contiguous(), "use_tma": True} if v_t else {}
    o, lse = grouped_shared_attention(
        q, kq.data, vq.data, offs, sel, sc, out=out, kv_scales=scales, fp8_mma=True,
        **SMALL, **extra,
    )  # fmt: skip
    ro, rl = grouped_shared_attention_ref(q, kq.data, vq.data, offs, sel, sc, kv_scales=scales)
    err_o, err_l = rel_err(o, ro), rel_err(lse, rl)
    assert err_o < TOL_O and err_l < TOL_O / 10, (err_o, err_l)


@pytest.mark.skipif(not _INTERPRET, reason="compiled Triton reads CUDA tensors only")
def test_fp8_mma_refuses_what_it_cannot_run():
    q, k, v, offs, sel = _inputs("cpu", torch.float16, lens=(32, 32))
    kq, vq = quantize(k, offs, "token"), quantize(v, offs, "token")
    kw = {"kv_scales": (kq.scale, vq.scale), "fp8_mma": True}
    with pytest.raises(ValueError, match="fp8_mma is for float8_e4m3fn"):
        grouped_shared_attention(q, k, v, offs, sel, 0.1, fp8_mma=True)
    with pytest.raises(ValueError, match="one"):
        grouped_shared_attention(q, kq.data, vq.data, offs, sel, 0.1, **kw, fp8_dot=True)
    with pytest.raises(ValueError, match="v_pool_t must be"):  # V as stored, not token-major
        grouped_shared_attention(q, kq.data, vq.data, offs, sel, 0.1, **kw, v_pool_t=vq.data)
    vt = vq.data.permute(1, 2, 0).contiguous()
    with pytest.raises(ValueError, match="use_tma"):
        grouped_shared_attention(
            q, kq.data, vq.data, offs, sel, 0.1, **kw, v_pool_t=vt, use_tma=False
        )
