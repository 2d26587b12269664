"""Chunk-affinity decode over a tiered library (`moska/library/tier_affinity.py`), timed.

The trace is a request's own: B requests each read k chunks, redrawn each with probability
`churn` at each step the request runs (a request that waits keeps its routing), replaced
after a geometric number of its own tokens; chunk popularity uniform or Zipf(s), each layer
under its own permutation of the chunk ids (as moska/bench/tiers.py's trace). Each step:
the scheduler picks the requests to run from their last routing and what is resident; they
route anew (churn), the step runs them through `ChunkTiers.attend` (misses waited for:
exact), and the chunks chosen for the held requests are fetched on the copy stream for the
next step. Reported: output tokens/s, per-request TPOT (seconds per token over its tokens:
p50 / p99 / max), the longest gap in steps, the mean requests per step, the GPU hit rate,
bytes per step, and the routing's step-to-step stability (share of a request's chunks kept
from its previous step).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moska.bench.tier_eviction import zipf_probs
from moska.kernels.selections import from_topk
from moska.library.tier_affinity import AffinityConfig, AffinityScheduler


class RequestTrace:
    """Per-request routing that moves only when the request runs (logical chunk ids)."""

    def __init__(self, chunks: int, batch: int, k: int, dist: str, churn: float,
                 lifetime: float, seed: int) -> None:  # fmt: skip
        self.rng = np.random.default_rng(seed)
        self.chunks, self.k, self.churn, self.lifetime = chunks, k, churn, lifetime
        self.probs = None if dist == "uniform" else zipf_probs(chunks, float(dist[4:]), self.rng)
        self.chosen = np.stack([self._fresh() for _ in range(batch)])  # [B, k]
        self.kept = self.seen = 0  # stability: chunks kept from a request's previous step

    def _fresh(self) -> np.ndarray:
        return self.rng.choice(self.chunks, size=self.k, replace=False, p=self.probs)

    def wants(self) -> dict[int, frozenset[int]]:
        return {b: frozenset(int(c) for c in row) for b, row in enumerate(self.chosen)}

    def advance(self, rows: list[int]) -> np.ndarray:
        """The rows' routing at this step (redrawn with churn; distinct per row): [n, k]."""
        for b in rows:
            if self.rng.random() < 1.0 / self.lifetime:
                self.chosen[b] = self._fresh()  # a new request in this place
                continue
            before = set(self.chosen[b].tolist())
            row = self.chosen[b]
            for j in np.nonzero(self.rng.random(self.k) < self.churn)[0]:
                p = None
                if self.probs is not None:
                    p = self.probs.copy()
                    p[row] = 0.0  # distinct: not one of the row's other chunks
                    p /= p.sum()
                row[j] = self.rng.choice(
                    [c for c in range(self.chunks) if c not in set(row.tolist())]
                    if p is None
                    else self.chunks,
                    p=p,
                )
            self.kept += len(before & set(row.tolist()))
            self.seen += self.k
        return self.chosen[rows]


def run_affinity(a, dist, churn, tiers, ops, device, mlp, cfg: AffinityConfig, pools=None):
    """Timed warmup + steps of chunk-affinity decode (see the module docstring); `pools`:
    the all-resident library, to check the first step's layer 0 against."""
    rng = np.random.default_rng(a.seed + 1)  # the same per-layer permutations as tiers.py
    perms = [torch.from_numpy(rng.permutation(a.chunks)) for _ in range(a.layers)]
    inv = [torch.argsort(p) for p in perms]
    trace = RequestTrace(a.chunks, a.batch, a.top_k, dist, churn, a.lifetime, a.seed)
    sched = AffinityScheduler(tiers.num_slots, cfg)
    dtype = tiers.k_pools[0].dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    q_all = torch.randn(a.batch, a.hq, a.d, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sm_scale = a.d**-0.5
    last_tok: dict[int, float] = {}
    gaps: dict[int, list[float]] = {b: [] for b in range(a.batch)}
    gap_steps: list[int] = []
    last_step: dict[int, int] = {}
    tokens = forced = 0
    t0, check = 0.0, float("nan")
    # start from the chunks the batch wants most (the lfu modes fill theirs in warmup steps)
    counts = np.bincount(trace.chosen.ravel(), minlength=a.chunks)
    first = [int(c) for c in np.argsort(-counts, kind="stable")[: tiers.num_slots]]
    for layer in range(a.layers):
        tiers.prefetch(layer, [int(perms[layer][c]) for c in first])
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
            base = tiers.stats.as_dict()
            last_tok = {b: t0 for b in range(a.batch)}
            last_step = {b: step - 1 for b in range(a.batch)}
        resident = set(range(a.chunks))
        for layer in range(a.layers):  # a logical chunk is resident when it is in every layer
            resident &= {int(inv[layer][c]) for c in tiers.resident(layer)}
        plan = sched.plan(trace.wants(), resident)
        run = sorted(int(b) for b in plan.run)
        rows = torch.from_numpy(trace.advance(run))  # [n, k] this step's routing
        q = q_all[run]
        x = None
        for layer in range(a.layers):
            sel = from_topk(perms[layer][rows].unsqueeze(1).to(device), a.hkv, a.chunks)
            o, _, _ = tiers.attend(ops, layer, q, sel, sm_scale, wait=True)
            if step == 0 and layer == 0 and pools is not None:  # the tiers are exact
                o_ref, _ = ops.grouped_shared(q, pools["k"][0], pools["v"][0],
                                              pools["offsets"], sel, sm_scale)  # fmt: skip
                check = float((o.float() - o_ref.float()).abs().max() / o_ref.float().abs().max())
            if mlp is not None:
                w1, w2, h = mlp
                x = torch.nn.functional.silu(h[: len(run)] @ w1)[:, : w2.shape[0]] @ w2
        in_use = set().union(*(set(r.tolist()) for r in rows)) if run else set()
        keep = (resident | in_use) - set(plan.evict)
        for layer in range(a.layers):  # the held requests' chunks, fetched while we go on
            p = perms[layer]
            tiers.prefetch(layer, [int(p[c]) for c in plan.fetch], [int(p[c]) for c in keep])
        sched.ran(plan.run)
        if step >= a.warmup:
            sync()  # per-token times (a sync per step; the resident loop syncs at its end)
            now = time.perf_counter()
            for b in run:
                gaps[b].append(now - last_tok[b])
                gap_steps.append(step - last_step[b])
                last_tok[b], last_step[b] = now, step
            tokens += len(run)
            forced += plan.forced
    sync()
    seconds = time.perf_counter() - t0
    st = tiers.stats.as_dict()
    hits = st["hits"]["gpu"] - base["hits"]["gpu"]
    misses = st["misses"]["gpu"] - base["misses"]["gpu"]
    tpot = np.array([float(np.mean(v)) for v in gaps.values() if v] or [float("nan")])
    starved = sum(1 for v in gaps.values() if not v)
    del x
    return {
        "mode": "affinity-wait",
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "requests_per_step": tokens / a.steps,
        "forced_per_step": forced / a.steps,
        "tpot_s": {
            "p50": float(np.percentile(tpot, 50)),
            "p99": float(np.percentile(tpot, 99)),
            "max": float(tpot.max()),
        },
        "max_gap_steps": max(gap_steps, default=0),
        "requests_without_token": starved,
        "gpu_hit_rate": hits / max(1, hits + misses),
        "gpu_misses_per_step": misses / a.steps,
        "gpu_bytes_per_step": (st["bytes_in"]["gpu"] - base["bytes_in"]["gpu"]) / a.steps,
        "routing_stability": trace.kept / max(1, trace.seen),
        "check_rel_err_vs_resident": check,
        "selections_kept_share": 1.0,
        "affinity": {"max_wait": cfg.max_wait, "swap_chunks": cfg.swap_chunks},
    }
