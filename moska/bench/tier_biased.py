"""Residency-biased routing over a tiered library (moska/library/tier_bias.py), timed.

The tiers benchmark's trace (moska/bench/tiers.py: every request each step, churn, Zipf or
uniform popularity, a permutation per layer) routes as before; then, as the biased router
would, each selection of a non-resident chunk is moved to a resident chunk (one the row does
not read yet) with probability `share` (bench/tier_bias_quality.py measures which share an
eps moves, and what it costs in loss: share 1.0 is eps = inf, routing among resident chunks
only). The move runs on the device against `ChunkTiers.resident_mask` (`remap_device`, a
few launches and no host sync, as a biased router masks its scores; the numpy `remap` ran on
the host before and alone took as long as an all-resident step at B = 256: bench/results/
tiers_h200_s14.json). At share 1.0 every routed chunk is resident by construction and reads
through `ChunkTiers.attend_resident` (sync-free); below it a step may miss and waits
(`attend`, exact for its selections). Every `swap_every` steps the unbiased routing's demand
(counted on the device each layer) is read once and up to `swap_chunks` of its most wanted
non-resident chunks per layer replace the least wanted resident ones on the copy stream.
Host time of the routing stand-in is reported beside the tokens/s.
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


def remap_device(phys: torch.Tensor, resident: torch.Tensor, share: float, gen) -> tuple:
    """`remap` on the device, as a residency-biased router would route (no host sync):
    phys [B, k] long chunk ids, resident [C] bool -> (rows [B, k] long, moved: the number of
    entries moved, a 0-dim device tensor). Each row keeps its resident chunks and each
    non-resident one with probability 1 - share; the others go to resident chunks the row
    does not read, drawn uniformly (top-k of random scores with the kept ones first)."""
    b, k = phys.shape
    dev = phys.device
    chosen = torch.zeros(b, resident.numel(), dtype=torch.bool, device=dev).scatter_(1, phys, True)
    keep = torch.rand(b, k, generator=gen, device=dev) >= share
    kept = torch.zeros_like(chosen).scatter_(1, phys, keep)
    scores = torch.rand(b, resident.numel(), generator=gen, device=dev) + 2.0 * chosen
    rows = scores.masked_fill(~(resident.unsqueeze(0) | kept), float("-inf")).topk(k).indices
    return rows, (~chosen.gather(1, rows)).sum()


def run_biased(a, steps_rows, share, tiers, ops, device, mlp, swap_every=4, swap_chunks=2,
               pools=None):  # fmt: skip
    """Timed warmup + steps of the trace `steps_rows` ([B, k] logical rows per step) with
    the residency bias (see the module docstring); `pools`: the all-resident library, to
    check the first sync-free read against."""
    rng = np.random.default_rng(a.seed + 1)  # the per-layer permutations of tiers.py
    perms = [rng.permutation(a.chunks) for _ in range(a.layers)]
    perm_dev = torch.from_numpy(np.stack(perms)).to(device)  # [L, C]
    gen = torch.Generator(device=device).manual_seed(a.seed + 2)
    dtype = tiers.k_pools[0].dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    q = torch.randn(a.batch, a.hq, a.d, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sm_scale = a.d**-0.5
    demand = torch.zeros(a.layers, a.chunks, device=device)
    ones = torch.ones(a.batch * a.top_k, device=device)
    moved = torch.zeros((), dtype=torch.long, device=device)
    total = layer_steps = 0
    host = t0 = 0.0
    check = float("nan")
    x = None
    sync_free = share >= 1  # every routed chunk resident by construction: no host read
    first = steps_rows[0]
    for layer in range(a.layers):  # warm: each layer's most wanted chunks of the first step
        counts = np.bincount(perms[layer][first].ravel(), minlength=a.chunks)
        tiers.prefetch(layer, [int(c) for c in np.argsort(-counts, kind="stable")])
    for step, logical in enumerate(steps_rows):
        if step == a.warmup:
            tiers.flush()  # the warmup's counts settled
            sync()
            t0, host = time.perf_counter(), 0.0
            moved.zero_()
            base = tiers.stats.as_dict()
        lg = _dev(logical, device)  # [B, k] logical chunk ids: one upload per step
        for layer in range(a.layers):
            h0 = time.perf_counter()
            phys = perm_dev[layer][lg]  # the unbiased routing's chunks
            rows, n_moved = remap_device(phys, tiers.resident_mask(layer), share, gen)
            host += time.perf_counter() - h0
            demand[layer].index_add_(0, phys.flatten(), ones)
            sel = from_topk(rows.unsqueeze(1), a.hkv, a.chunks)
            if sync_free:
                o, _ = tiers.attend_resident(ops, layer, q, sel, sm_scale)  # counts its hits
                if pools is not None and math.isnan(check):  # once: the sync-free read is exact
                    ref, _ = ops.grouped_shared(q, pools["k"][layer], pools["v"][layer],
                                                pools["offsets"], sel, sm_scale)  # fmt: skip
                    check = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
            else:
                tiers.attend(ops, layer, q, sel, sm_scale, wait=True)
            if step >= a.warmup:
                moved += n_moved
                total += rows.numel()
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
        "moved_share": int(moved) / max(1, total),
        "sync_free_layer_share": float(sync_free),
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
