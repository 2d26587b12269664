"""The decoder's elementwise kernels (RMSNorm with a fused residual add, SiLU-and-mul)
against their PyTorch references on fresh random inputs."""

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.activation import silu_and_mul, silu_and_mul_ref
from moska.kernels.rms_norm import rms_norm, rms_norm_ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("h", [96, 1000])
def test_rms_norm_with_and_without_residual(dtype, h):
    big = torch.randn(3, h + 24, dtype=dtype)
    x = big[:, :h]  # rows strided past their length
    w = (1.0 + 0.1 * torch.randn(h)).to(dtype)
    r = torch.randn(3, h, dtype=dtype)
    assert rel_err(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)) < TOL[dtype]
    out, summed = rms_norm(x, w, 1e-6, residual=r)
    ref_out, ref_summed = rms_norm_ref(x, w, 1e-6, residual=r)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert torch.equal(summed, ref_summed)  # the residual stream is the plain dtype add
    assert rms_norm(x[:0], w, 1e-5).shape == (0, h)


def test_rms_norm_rejects_bad_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), 1e-5, residual=torch.randn(2, 9))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(x.t(), torch.ones(2), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("inter", [100, 3000])
def test_silu_and_mul(dtype, inter):
    x = 3 * torch.randn(4, 2 * inter, dtype=dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < TOL[dtype]
    assert silu_and_mul(x[:0]).shape == (0, inter)
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(2, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotary_inplace_on_strided_qkv_views(dtype):
    from moska.kernels.rotary import rotary_inplace, rotary_ref

    t, hq, hkv, d = 5, 6, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    ang = torch.arange(t)[:, None] * (1e4 ** (-torch.arange(d // 2) / (d // 2)))[None, :] * 7
    cos, sin = ang.cos().float(), ang.sin().float()
    ref_q, ref_k = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    rotary_inplace(q, k, cos, sin)
    assert rel_err(q, ref_q) < TOL[dtype] and rel_err(k, ref_k) < TOL[dtype]
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)  # v untouched
    with pytest.raises(ValueError, match="cos"):
        rotary_inplace(q, k, cos[:, :3], sin)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_model_with_triton_layers_matches_torch_layers(arch):
    # the whole decoder with fused kernels (norm + residual, RoPE in place, SiLU-and-mul)
    # against the same weights run with the PyTorch layers
    from moska.kernel_ops import kernel_ops
    from moska.model.config import ModelConfig
    from moska.model.llama import CausalLM

    cfg = ModelConfig.from_dict(
        {
            "architectures": [arch],
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 100,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        }
    )  # fmt: skip
    model = CausalLM(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / 8)

    def attn(layer, q, k, v):  # causal attention over the T tokens of one sequence
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
        )
        return o.transpose(0, 1)

    ids = torch.randint(0, 100, (7,))
    pos = torch.arange(100, 107)  # positions past the original context: scaled RoPE
    with torch.no_grad():
        model.kernels = kernel_ops("torch")
        ref = model(ids, pos, attn)
        model.kernels = kernel_ops("triton")
        out = model(ids, pos, attn)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (40, 8)])
def test_rotary_inplace_head_blocks(dtype, hq, hkv):
    # d = 128: at most 32 heads per program, so 40 query heads take two blocks of q
    from moska.kernels.rotary import rotary_inplace, rotary_ref

    t, d = 3, 128
    q, k = torch.randn(t, hq, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype)
    cos, sin = torch.rand(t, d // 2) * 2 - 1, torch.rand(t, d // 2) * 2 - 1
    ref_q, ref_k = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    rotary_inplace(q, k, cos, sin)
    assert rel_err(q, ref_q) < TOL[dtype] and rel_err(k, ref_k) < TOL[dtype]
    strided = torch.randn(t, hq, 2 * d, dtype=dtype)[:, :, ::2]  # [T, Hq, D], stride 2
    with pytest.raises(ValueError, match="contiguous"):
        rotary_inplace(strided, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kv_write_strided_views_and_cast(dtype):
    from moska.kernels.kv_write import kv_write, kv_write_ref

    t, hq, hkv, d, slots = 5, 4, 2, 64, 40
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    slot = torch.randperm(slots)[:t]
    kc, vc = torch.randn(slots, hkv, d), torch.randn(slots, hkv, d)  # fp32 cache: a cast
    rk, rv = kc.clone(), vc.clone()
    kv_write(k, v, kc, vc, slot)
    kv_write_ref(k, v, rk, rv, slot)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)  # untouched slots stay as they were
    kv_write(k[:0], v[:0], kc, vc, slot[:0])  # no tokens: nothing to do
    with pytest.raises(ValueError, match="disagree"):
        kv_write(k, v, kc, vc, slot[:3])
    wide = torch.randn(slots, hkv, 2 * d)
    with pytest.raises(ValueError, match="contiguous"):
        kv_write(k, v, wide[:, :, ::2], wide[:, :, 1::2], slot)
