"""The FlexiCache speed bench's pieces: the full-KV baseline (eager, and replayed from a CUDA
graph on a GPU) against plain attention, and the store's peak of resident pages, now counted
once per re-ranking step (`_account_ranked`), against the resident pages seen after every
layer."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moska.bench import flexicache_fullkv as fullkv
from moska.bench.common import random_loaded_model
from moska.flexicache import FlexiCacheConfig
from moska.flexicache.store import FlexiKV
from moska.kernel_ops import kernel_ops
from moska.kernels.paged_heads import paged_decode_heads_ref

TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "torch_dtype": "float32",
}  # fmt: skip


def test_full_kv_attends_over_each_rows_context_and_writes_the_new_token():
    torch.manual_seed(0)
    mc = SimpleNamespace(num_kv_layers=2, num_kv_heads=2, head_dim=16, sm_scale=0.25)
    attn = fullkv.FullKV(mc, 3, 21, 3, 8, torch.float32, "cpu", kernel_ops("torch"))
    b, hq, d, hkv = 3, 4, 16, 2
    attn.length = 13
    assert attn.begin() == "plain"
    q, k, v = torch.randn(b, hq, d), torch.randn(b, hkv, d), torch.randn(b, hkv, d)
    o = attn(1, q, k, v)
    kc = attn.k[1].view(b, -1, hkv, d)[:, :13]  # [B, T, Hkv, D]: each row's pages in order
    vc = attn.v[1].view(b, -1, hkv, d)[:, :13]
    assert torch.equal(kc[:, 12], k) and torch.equal(vc[:, 12], v)
    g = hq // hkv
    kr, vr = kc.repeat_interleave(g, 2), vc.repeat_interleave(g, 2)
    w = torch.softmax(torch.einsum("bhd,bthd->bht", q, kr) * 0.25, -1)
    torch.testing.assert_close(o, torch.einsum("bht,bthd->bhd", w, vr), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_kv_graph_replay_equals_the_eager_step_on_cuda():
    torch.manual_seed(0)
    lm = random_loaded_model(TINY, torch.float32, "cuda")
    ops = kernel_ops("triton", "cuda")
    lm.model.kernels = ops
    attn = fullkv.FullKV(lm.config, 3, 21, 3, 8, torch.float32, "cuda", ops)
    tokens = torch.randint(0, 128, (3,), device="cuda")
    eager = fullkv.eager_step(lm.model, attn)
    graphed = fullkv.graph_step(lm.model, attn, tokens)
    a = b = tokens
    for length in (14, 15, 16):
        attn.length = length
        attn.begin()
        a = eager(a)
        ka = attn.k.clone()
        attn.begin()
        b = graphed(b.clone())
        assert torch.equal(a, b) and torch.equal(attn.k, ka)


def test_peak_resident_pages_is_the_most_seen_after_any_layer():
    """No compaction (large slack): the peak counted at the end of each re-ranking step is
    the most resident pages seen after any layer of any step, here before the last
    re-ranking drops pages."""
    L, B, H, G, D, BS, P, T0 = 2, 2, 2, 2, 16, 4, 20, 42
    gen = torch.Generator().manual_seed(5)
    cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, sink_pages=1, rerank_interval=3,
                           threshold=0.5)  # fmt: skip
    store = FlexiKV(
        cfg, num_layers=L, batch=B, num_kv_heads=H, head_dim=D, block_size=BS, max_pages=P,
        dtype=torch.float32, device="cpu", zero_copy=True, hysteresis=False, pool_slack=50.0,
    )  # fmt: skip
    for layer in range(L):
        for b in range(B):
            k, v = torch.randn(2, T0, H, D, generator=gen)
            store.write_prompt(layer, b, k, v, torch.randn(H * G, D, generator=gen))
    store.finish_prompts()
    seen = 0
    for step in range(7):  # re-rankings at steps 0, 3, 6; a page starts at step 2
        if step == 4:  # every head stable from step 6's re-ranking: resident pages fall
            store.cfg = replace(cfg, threshold=0.0)
        store.begin_step()
        for layer in range(L):
            q = torch.randn(B, H * G, D, generator=gen)
            k, v = torch.randn(2, B, H, D, generator=gen)
            store.attend(layer, q, k, v, paged_decode_heads_ref, D**-0.5)
            seen = max(seen, store.resident_pages())
    assert store.peak_resident_pages == seen > store.resident_pages()


def _run_store(device: str, decode_fn, steps: int = 9):
    """Outputs and counters of a store over `steps` decode steps (forced classes, hysteresis,
    re-rankings at steps 0, 3, 6: fetches in place on CUDA, counters and peak at the end of
    each re-ranking step)."""
    L, B, H, G, D, BS, P, T0 = 2, 2, 2, 2, 16, 4, 20, 42
    gen = torch.Generator().manual_seed(9)
    cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, sink_pages=1, rerank_interval=3,
                           threshold=2.0)  # fmt: skip
    force = torch.rand(L, B, H, generator=gen) < 0.6
    store = FlexiKV(
        cfg, num_layers=L, batch=B, num_kv_heads=H, head_dim=D, block_size=BS, max_pages=P,
        dtype=torch.float32, device=device, force_stable=force, zero_copy=device == "cpu" or None,
    )  # fmt: skip
    for layer in range(L):
        for b in range(B):
            k, v = torch.randn(2, T0, H, D, generator=gen).to(device)
            store.write_prompt(layer, b, k, v, torch.randn(H * G, D, generator=gen).to(device))
    store.finish_prompts()
    outs = []
    for _ in range(steps):
        store.begin_step()
        for layer in range(L):
            q = torch.randn(B, H * G, D, generator=gen).to(device)
            k, v = torch.randn(2, B, H, D, generator=gen).to(device)
            outs.append(store.attend(layer, q, k, v, decode_fn, D**-0.5).cpu())
    counts = (store.fetched_pages, store.refetched_pages, store.peak_resident_pages)
    return torch.stack(outs), counts, store.host_reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_on_cuda_equals_the_cpu_reference():
    from moska.kernels.paged_heads import paged_decode_heads

    out_c, counts_c, _ = _run_store("cpu", paged_decode_heads_ref)
    out_g, counts_g, reads = _run_store("cuda", paged_decode_heads)
    torch.testing.assert_close(out_g, out_c, rtol=1e-4, atol=1e-4)
    assert counts_g == counts_c and counts_c[0] > 0
    assert reads <= 2 * 3 + 2  # one read per re-ranking step (+ the in-place fetch's check)
