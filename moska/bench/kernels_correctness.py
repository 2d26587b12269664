"""Correctness pass of the kernel benchmark: bf16 on the GPU vs the references."""

import torch
import triton

from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, G, pairs_sel, rel, sorted_sel
from moska.kernels.paged_attention import (
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
)
from moska.kernels.selections import from_topk, from_topk_ref
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref


def correctness(k_pool, v_pool):
    out = {}
    # grouped shared attention, ragged chunks, random selections
    lens = [1, 700, 4096, 3000, 64]
    offs = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    s = int(offs[-1])
    b = 12
    q = torch.randn(b, HQ, D, device=DEV, dtype=DT)
    pairs = torch.rand(b, len(lens), device=DEV) < 0.5
    r, c = pairs.nonzero(as_tuple=True)
    sel = pairs_sel(r, c, b)
    ro, rl = grouped_shared_attention_ref(q, k_pool[:s], v_pool[:s], offs, sel, SCALE)
    for name, kw in (
        ("", {"use_tma": False}),
        ("_tma", {"use_tma": True}),
    ):
        o, lse = grouped_shared_attention(q, k_pool[:s], v_pool[:s], offs, sel, SCALE, **kw)
        out["shared_ragged" + name] = max(rel(o, ro), rel(lse, rl))
    # key-max pair scores (ragged pairs) vs the fp32 reference
    from moska.kernels.router import build_routing_index
    from moska.kernels.router_ref import keymax_scores_ref
    from moska.kernels.router_scores import keymax_pair_scores

    index = build_routing_index(k_pool[:s], offs)
    pr, pc = r.int(), c.int()
    order = torch.argsort(pc * b + pr)
    pr, pc = pr[order].contiguous(), pc[order].contiguous()
    got = keymax_pair_scores(q, index.basis, index.lowrank_keys, offs, pr, pc)
    want = keymax_scores_ref(q, index.basis, index.lowrank_keys, offs)[pr.long(), :, pc.long()]
    out["keymax_pairs"] = rel(got, want)
    # sort-free selections vs the sort
    idx = torch.rand(300, 8, 256, device=DEV).topk(8, -1).indices
    got, want = from_topk(idx, HKV, 256), from_topk_ref(idx, HKV)
    out["from_topk_mismatches"] = float(
        sum(
            int((getattr(got, n) != getattr(want, n)).sum())
            for n in ("req", "kv_head", "chunk", "row_order")
        )
    )
    # one long chunk chosen by 16 requests (split-KV path) vs fp32 math
    S = 131072
    q = torch.randn(16, HQ, D, device=DEV, dtype=DT)
    sel = sorted_sel(torch.zeros(16, 1, dtype=torch.long, device=DEV), 1)
    qr = q.view(16, HKV, G, D).transpose(0, 1).reshape(HKV, 16 * G, D).float()
    sc = qr @ k_pool[:S].float().transpose(0, 1).transpose(1, 2) * SCALE  # [Hkv, rows, S]
    ref = torch.softmax(sc, -1) @ v_pool[:S].float().transpose(0, 1)  # [Hkv, rows, D]
    offs1 = torch.tensor([0, S], dtype=torch.int32, device=DEV)
    for name, kw in (
        ("", {"use_tma": False, "block_m": 128, "num_warps": 8}),
        ("_tma", {"use_tma": True, "block_m": 128, "num_warps": 8}),
        ("_default", {}),  # 64-row tiles, ~32 splits each: the merge of split tiles
    ):
        o, lse = grouped_shared_attention(q, k_pool[:S], v_pool[:S], offs1, sel, SCALE, **kw)
        out["shared_131k_b16" + name] = max(
            rel(o.view(HKV, 16 * G, D), ref), rel(lse.view(HKV, 16 * G), torch.logsumexp(sc, -1))
        )
    del sc
    # paged decode and prefill
    seq = [1, 77, 5000, 2048]
    bs = 16
    need = [triton.cdiv(x, bs) for x in seq]
    nb = sum(need)
    perm = torch.randperm(nb, device=DEV).int()
    bt = torch.zeros(len(seq), max(need), dtype=torch.int32, device=DEV)
    i = 0
    for j, n in enumerate(need):
        bt[j, :n] = perm[i : i + n]
        i += n
    kc = torch.randn(nb, bs, HKV, D, device=DEV, dtype=DT)
    vc = torch.randn_like(kc)
    sl = torch.tensor(seq, dtype=torch.int32, device=DEV)
    q = torch.randn(len(seq), HQ, D, device=DEV, dtype=DT)
    o, lse = paged_decode_attention(q, kc, vc, bt, sl, SCALE)
    ro, rl = paged_attention_ref(
        q, kc, vc, bt, torch.arange(len(seq) + 1, dtype=torch.int32, device=DEV), sl, SCALE
    )
    out["paged_decode"] = max(rel(o, ro), rel(lse, rl))
    ql = [1, 77, 300, 2048]
    cu = torch.tensor([0] + torch.tensor(ql).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(int(cu[-1]), HQ, D, device=DEV, dtype=DT)
    o, lse = paged_prefill_attention(q, kc, vc, bt, cu, sl, SCALE)
    ro, rl = paged_attention_ref(q, kc, vc, bt, cu, sl, SCALE)
    out["paged_prefill"] = max(rel(o, ro), rel(lse, rl))
    return out
