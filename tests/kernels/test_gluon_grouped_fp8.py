"""The Gluon FP8 grouped program (issue 16): its host side on CPU (q cut per row, the input
checks); the kernel against the fp32 reference over the same e4m3 library on Hopper (a CUDA
test; `python -m moska.bench.fp8_gluon` checks and times it at full size)."""

import pytest
import torch

from moska.kernels.gluon_grouped_fp8 import check_inputs, quantize_rows


def test_quantize_rows_keeps_each_row_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 64, generator=gen) * torch.rand(3, 8, 1, generator=gen) * 10
    q8, s = quantize_rows(q)
    assert q8.dtype == torch.float8_e4m3fn and s.shape == (3, 8)
    back = q8.float() * s[..., None]
    assert ((back - q).abs() <= q.abs() * 2**-4 + s[..., None] * 2**-9).all()
    assert torch.allclose(q8.float().abs().amax(-1), torch.full((3, 8), 448.0))


def test_check_inputs_refuses_what_cannot_run():
    q = torch.randn(2, 8, 64)
    k8 = torch.zeros(256, 2, 64).to(torch.float8_e4m3fn)
    v8_t = torch.zeros(2, 64, 256).to(torch.float8_e4m3fn)
    sc = torch.ones(256, 2)
    with pytest.raises(ValueError, match="Hopper"):
        check_inputs(q, k8, v8_t, sc, sc, 128)


def _inputs(dev="cuda", C=3, L=384, Hkv=2, D=128, B=5, k=2, seed=1):
    from moska.kernels.selections import from_topk
    from moska.library.fp8 import quantize

    gen = torch.Generator(device=dev).manual_seed(seed)
    kf = torch.randn(C * L, Hkv, D, device=dev, generator=gen)
    vf = torch.randn(C * L, Hkv, D, device=dev, generator=gen)
    offs = torch.arange(0, C * L + 1, L, dtype=torch.int32, device=dev)
    kq, vq = quantize(kf, offs, "block"), quantize(vf, offs, "block")
    q = torch.randn(B, 4 * Hkv, D, device=dev, generator=gen).to(torch.bfloat16)
    chunks = torch.stack([torch.randperm(C, device=dev, generator=gen)[:k] for _ in range(B)])
    sel = from_topk(chunks.view(B, 1, k).int(), Hkv, C)
    return q, kq, vq, offs, sel


@pytest.mark.cuda
def test_gluon_fp8_matches_the_reference_on_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Hopper only")
    from moska.bench.fp8_gluon import gluon_call
    from moska.kernels.shared_attention import grouped_shared_attention_ref

    q, kq, vq, offs, sel = _inputs()
    scale = 128**-0.5
    v_t = vq.data.permute(1, 2, 0).contiguous()
    ro, rl = grouped_shared_attention_ref(q, kq.data, vq.data, offs, sel, scale,
                                          kv_scales=(kq.scale, vq.scale))  # fmt: skip
    for stages, persistent in ((3, False), (4, True)):
        o, lse = gluon_call(q, kq.data, v_t, (kq.scale, vq.scale), offs, sel, scale, stages,
                            persistent, 132)  # fmt: skip
        assert (o.float() - ro).norm() / ro.norm() < 5e-2
        assert (lse - rl).norm() / rl.norm() < 5e-3
