"""Eviction policies of the tiered library's GPU chunk cache on routing traces (CPU only).

A trace: B requests in flight, each reading k chunks of C per step; a request keeps its
chunks from step to step except that each is redrawn with probability `churn` (routing
stability; `bench/tier_prefetch_study.py` measures it on a real model), and a request
ends after a geometric number of steps (mean `lifetime`) and is replaced by a new one.
Chunks are drawn uniformly or from Zipf(s) over a random permutation of the chunks. Each
step the distinct chunks are admitted into a cache of `capacity` slots exactly as
`ChunkTiers.attend` does (`SlotCache`, in passes when they exceed the slots). Reported: hit
rate (chunks already resident when routed), misses per step (x chunk bytes = bytes moved).

    python -m moska.bench.tier_eviction --out bench/results/tier_eviction.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import numpy as np

from moska.library.chunk_cache import EVICTION_POLICIES, SlotCache


def zipf_probs(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    p /= p.sum()
    return p[rng.permutation(n)]  # popular chunks anywhere in the library


def trace(
    num_chunks: int, batch: int, k: int, steps: int, dist: str, churn: float,
    lifetime: float, seed: int,
):  # fmt: skip
    """Yields, per step, the distinct chunks the batch routes to."""
    rng = np.random.default_rng(seed)
    probs = None if dist == "uniform" else zipf_probs(num_chunks, float(dist[4:]), rng)

    def draw(n):
        return rng.choice(num_chunks, size=n, p=probs)

    chosen = np.stack([draw(k) for _ in range(batch)])  # [B, k]
    for _ in range(steps):
        redraw = rng.random(chosen.shape) < churn
        chosen[redraw] = draw(int(redraw.sum()))
        ended = rng.random(batch) < 1.0 / lifetime
        for b in np.nonzero(ended)[0]:
            chosen[b] = draw(k)
        yield np.unique(chosen).tolist()


def simulate(policy: str, capacity: int, steps_iter) -> dict:
    cache: SlotCache[int] = SlotCache(capacity, policy)
    hits = misses = steps = 0
    for needed in steps_iter:
        cache.tick()
        steps += 1
        needed = sorted(needed, key=lambda c: c not in cache)  # as ChunkTiers.attend
        for i in range(0, len(needed), capacity):
            adm = cache.admit(needed[i : i + capacity])
            hits += len(adm.hits)
            misses += len(adm.loads) + len(adm.overflow)
    return {
        "hit_rate": hits / max(1, hits + misses),
        "misses_per_step": misses / max(1, steps),
        "chunks_per_step": (hits + misses) / max(1, steps),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--resident", type=float, default=0.25, help="share of chunks in slots")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--churn", type=float, default=0.1, help="per-step redraw probability")
    ap.add_argument("--lifetime", type=float, default=128.0, help="mean steps of a request")
    ap.add_argument("--dists", default="uniform,zipf1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--chunk-mib", type=float, default=512.0, help="K+V MiB of one chunk, one layer"
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    capacity = max(1, int(a.chunks * a.resident))
    rows = []
    t0 = time.time()
    for dist in a.dists.split(","):
        for policy in EVICTION_POLICIES:
            steps = trace(a.chunks, a.batch, a.top_k, a.steps, dist, a.churn, a.lifetime, a.seed)
            r = simulate(policy, capacity, steps)
            r.update(dist=dist, policy=policy, mib_per_step=r["misses_per_step"] * a.chunk_mib)
            rows.append(r)
            print(f"{dist:10s} {policy}: hit {r['hit_rate']:.3f}, "
                  f"{r['misses_per_step']:.1f} misses/step of {r['chunks_per_step']:.1f}")  # fmt: skip
    best = {}
    for dist in a.dists.split(","):
        by = {r["policy"]: r for r in rows if r["dist"] == dist}
        best[dist] = {
            "lru_hit_rate": by["lru"]["hit_rate"],
            "lfu_hit_rate": by["lfu"]["hit_rate"],
            "lfu_minus_lru": by["lfu"]["hit_rate"] - by["lru"]["hit_rate"],
        }
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True
    )
    result = {
        "benchmark": "tier_eviction",
        "command": "python -m moska.bench.tier_eviction " + " ".join(argv or sys.argv[1:]),
        "config": {**vars(a), "capacity": capacity},
        "device": "cpu (simulation of the slot bookkeeping; no data moved)",
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "git_commit": commit.stdout.strip(),
        "seconds": time.time() - t0,
        "rows": rows,
        "summary": best,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
