"""The reuse path on a GPU (compiled Triton: `TRITON_INTERPRET=0 pytest -m cuda`) against
the same path on the CPU in fp32, on the built-in tiny model: the plan's fp16 features and
fp16 matching find the CPU's matches, and a blend (fused gather-rotate-scatter, kv_write,
row attention kernel) writes the CPU blend's KV with the same counts and one host sync."""

import os
import warnings

import pytest
import torch

from moska.attention.kv_cache import PagedKVCache
from moska.kernel_ops import kernel_ops
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.config import SemShareConfig
from moska.semshare.reuse import SemanticReuse

_CUDA = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)


def _setup(device, dtype, ref_ids):
    model = load_model(default_model_dir(), dtype=dtype, device=device).model
    model.kernels = kernel_ops("auto", device)
    c = model.config
    cache = PagedKVCache(c.num_kv_layers, 40, 16, c.num_kv_heads, c.head_dim, dtype, device)
    with torch.inference_mode():
        extend(model, cache, list(range(20)), ref_ids, 0)
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    reuse.store.put(reuse.reference("ref", ref_ids, list(range(20))))
    return model, cache, reuse


@_CUDA
def test_cuda_reuse_path_equals_cpu():
    gen = torch.Generator().manual_seed(21)
    ref_ids = torch.randint(0, 256, (300,), generator=gen)
    ids = torch.cat([ref_ids[:100], torch.randint(0, 256, (9,), generator=gen), ref_ids[100:]])
    ids[[30, 150, 250]] = (ids[[30, 150, 250]] + 1) % 256
    runs = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float16)):
        model, cache, reuse = _setup(device, dtype, ref_ids)
        plan = reuse.plan(ids.tolist())
        assert plan is not None
        runs[device] = (model, cache, plan)
    cpu_pos, gpu_pos = runs["cpu"][2].ref_pos, runs["cuda"][2].ref_pos.cpu()
    assert (cpu_pos == gpu_pos).float().mean() > 0.98  # fp16 cosines: borderline ties only
    results = {}
    for device, (model, cache, plan) in runs.items():

        def blend(f, model=model, cache=cache, plan=plan):
            table = list(range(20, 40))
            return blend_prefill(model, cache, table, ids[:-1], 0, plan.ref, cpu_pos[:-1], f, 1)

        part = blend(0.15)  # the deviation ranking runs too (rows may differ by fp16 ties)
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(1)
            res = blend(0.0)  # every matched row reused: the KV is comparable
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in log)
        results[device] = (res, cache, syncs, part)
    (res_c, cache_c, _, part_c), (res_g, cache_g, syncs, part_g) = results.values()
    assert res_c == res_g and res_g.num_reused > 0 and part_c == part_g
    assert syncs <= 2, syncs  # the matched count's nonzero (and at most one more)
    n = ids.shape[0] - 1
    flat = (cache_c.k.shape[0], -1, *cache_c.k.shape[-2:])
    slots = torch.arange(320, 320 + n)
    for a, b in ((cache_g.k, cache_c.k), (cache_g.v, cache_c.v)):
        got, want = a.view(flat)[:, slots.cuda()].double().cpu(), b.view(flat)[:, slots].double()
        assert float((got - want).norm() / want.norm()) < 1e-2
