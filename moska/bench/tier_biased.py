"""Residency-biased routing over a tiered library (moska/library/tier_bias.py), timed.

The tiers benchmark's trace (moska/bench/tiers.py: every request each step, churn, Zipf or
uniform popularity, a permutation per layer) routes as before; then, as the biased router
would, each selection of a non-resident chunk is moved to a resident chunk (one the row does
not read yet) with probability `share` (bench/tier_bias_quality.py measures which share an
eps moves, and what it costs in loss: share 1.0 is eps = inf, routing among resident chunks
only). A step whose selections are all resident reads through `ChunkTiers.attend_resident`
(no host sync: the residency is known to the router, as with `resident_mask` on the device);
one with misses waits for them (`attend`, exact for its selections). Every `swap_every` steps
the unbiased routing's demand (counted on the device each layer) is read once and up to
`swap_chunks` of its most wanted non-resident chunks per layer replace the least wanted
resident ones on the copy stream. Host time of the remap (numpy, inside the timed loop: a
GPU router masks its scores instead) is reported beside the tokens/s.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from moska.kernels.selections import from_topk


def remap(phys: np.ndarray, resident: np.ndarray, share: float, rng) -> np.ndarray:
    """Rows [B, k] with each non-resident chunk moved, with probability `share`, to a
    resident chunk the row does not read (distinct per row); `resident` [C] bool."""
    res_ids = np.nonzero(resident)[0]
    out = phys.copy()
    move = ~resident[out] & (rng.random(out.shape) < share)
    if not move.any() or res_ids.size == 0:
        return out
    b, k = out.shape
    cand = res_ids[np.argsort(rng.random((b, res_ids.size)), axis=1)]  # [B, R] shuffled
    free = ~(cand[:, :, None] == out[:, None, :]).any(-1)  # [B, R] not in the row
    nth = np.cumsum(move, axis=1) - 1  # the t-th moved entry of its row takes the t-th free
    rank = np.cumsum(free, axis=1) - 1  # [B, R]
    for j in range(k):
        rows = np.nonzero(move[:, j])[0]
        hit = free[rows] & (rank[rows] == nth[rows, j][:, None])
        ok = hit.any(1)
        out[rows[ok], j] = cand[rows[ok], hit[ok].argmax(1)]
    return out


def run_biased(a, steps_rows, share, tiers, ops, device, mlp, swap_every=4, swap_chunks=2,
               pools=None):  # fmt: skip
    """Timed warmup + steps of the trace `steps_rows` ([B, k] logical rows per step) with
    the residency bias (see the module docstring); `pools`: the all-resident library, to
    check the first sync-free read against."""
    rng = np.random.default_rng(a.seed + 1)  # the per-layer permutations of tiers.py
    perms = [rng.permutation(a.chunks) for _ in range(a.layers)]
    rng = np.random.default_rng(a.seed + 2)
    dtype = tiers.k_pools[0].dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    q = torch.randn(a.batch, a.hq, a.d, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sm_scale = a.d**-0.5
    demand = torch.zeros(a.layers, a.chunks, device=device)
    ones = torch.ones(a.batch * a.top_k, device=device)
    moved = total = sync_free = layer_steps = 0
    host = t0 = 0.0
    check = float("nan")
    x = None
    for step, logical in enumerate(steps_rows):
        if step == a.warmup:
            tiers.flush()  # the warmup's counts settled
            sync()
            t0, host = time.perf_counter(), 0.0
            base = tiers.stats.as_dict()
        for layer in range(a.layers):
            h0 = time.perf_counter()
            phys = perms[layer][logical]
            resident = np.zeros(a.chunks, dtype=bool)
            resident[list(tiers.caches[layer].slot_of)] = True
            rows = remap(phys, resident, share, rng)
            all_res = bool(resident[rows].all())
            host += time.perf_counter() - h0
            # to the device from pinned memory, non-blocking: a pageable copy would wait for
            # the queued work, a host sync per layer
            # index_add_, not bincount: bincount reads its input's max on the host (a sync)
            demand[layer].index_add_(0, _dev(phys.ravel(), device), ones)
            sel = from_topk(_dev(rows, device).unsqueeze(1), a.hkv, a.chunks)
            if all_res:
                o, _ = tiers.attend_resident(ops, layer, q, sel, sm_scale)  # counts its hits
                if pools is not None and math.isnan(check):  # once: the sync-free read is exact
                    ref, _ = ops.grouped_shared(q, pools["k"][layer], pools["v"][layer],
                                                pools["offsets"], sel, sm_scale)  # fmt: skip
                    check = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
            else:
                tiers.attend(ops, layer, q, sel, sm_scale, wait=True)
            if step >= a.warmup:
                moved += int((rows != phys).sum())
                total += rows.size
                sync_free += all_res
                layer_steps += 1
            if mlp is not None:
                w1, w2, h = mlp
                x = torch.nn.functional.silu(h @ w1)[:, : w2.shape[0]] @ w2
        if (step + 1) % swap_every == 0:
            _swap(tiers, demand, swap_chunks)
    sync()
    seconds = time.perf_counter() - t0
    tiers.flush()
    st = tiers.stats.as_dict()
    del x
    hits = st["hits"]["gpu"] - base["hits"]["gpu"]
    misses = st["misses"]["gpu"] - base["misses"]["gpu"]
    return {
        "mode": f"biased{share:g}-wait",
        "seconds": seconds,
        "tokens_per_s": a.batch * a.steps / seconds,
        "host_remap_s": host,
        "moved_share": moved / max(1, total),
        "sync_free_layer_share": sync_free / max(1, layer_steps),
        "gpu_hit_rate": hits / max(1, hits + misses),
        "gpu_misses_per_step": misses / a.steps,
        "gpu_bytes_per_step": (st["bytes_in"]["gpu"] - base["bytes_in"]["gpu"]) / a.steps,
        "selections_kept_share": 1.0,
        "bias_share": share,
        "check_rel_err_vs_resident": check,
    }


def _dev(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _swap(tiers, demand: torch.Tensor, swap_chunks: int) -> None:
    """The most wanted non-resident chunks in for the least wanted resident ones (one host
    read of the demand counters), then the counters age by half."""
    d = demand.cpu()
    for layer in range(tiers.num_layers):
        order = d[layer].argsort(descending=True).tolist()
        want = order[: tiers.num_slots]
        resident = tiers.resident(layer)
        fetch = [c for c in want if c not in resident][:swap_chunks]
        if fetch:
            keep = [c for c in want if c in resident]
            tiers.prefetch(layer, fetch, keep)
    demand.mul_(0.5)
