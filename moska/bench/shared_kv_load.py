"""Per-shared-rank load under Zipf routing, with and without hot-chunk replicas.

Logic only, on the CPU: routing is simulated (each request draws top_k distinct chunks
with Zipf popularity), and the counts are what ``partition.destinations`` would send each
shared rank. ``selections``: (query-head group, chunk) pairs a rank attends — its work, the
chunks being of one length; ``rows``: distinct query rows it receives (its bytes in).
Replicas are planned from a profiling window of steps and measured on later steps.

    python -m moska.bench.shared_kv_load [--chunks 64 --ranks 3 --batch 256 --top-k 8 ...]
"""

from __future__ import annotations

import argparse
import json

import torch

from moska.distributed.partition import ChunkPlacement, rank_loads
from moska.kernels.selections import from_topk


def zipf_selections(
    batch: int, num_chunks: int, top_k: int, num_kv_heads: int, s: float, gen: torch.Generator
):
    """One step's Selections: every request draws top_k distinct chunks, chunk c (after a
    fixed shuffle) with probability proportional to 1 / (popularity rank)^s (Gumbel top-k)."""
    popularity = torch.arange(1, num_chunks + 1, dtype=torch.float64) ** -s
    perm = torch.randperm(num_chunks, generator=torch.Generator().manual_seed(0))
    logp = popularity.log()[perm]  # chunk id -> log popularity, hot chunks scattered
    gumbel = -torch.log(
        -torch.log(torch.rand(batch, num_chunks, generator=gen, dtype=torch.float64))
    )
    idx = (logp + gumbel).topk(top_k, dim=-1).indices  # [B, K]
    return from_topk(idx[:, None, :], num_kv_heads, num_chunks)


def load_report(
    num_chunks: int = 64,
    num_ranks: int = 3,
    batch: int = 256,
    top_k: int = 8,
    num_kv_heads: int = 8,
    zipf_s: float = 1.1,
    slots_per_rank: int = 4,
    profile_steps: int = 4,
    steps: int = 16,
    seed: int = 0,
) -> dict:
    """Mean per-rank load per step and max/mean imbalance, by chunk id and with replicas."""
    gen = torch.Generator().manual_seed(seed)
    base = ChunkPlacement.by_chunk_id(num_chunks, num_ranks)
    counts = torch.zeros(num_chunks, dtype=torch.float64)
    for _ in range(profile_steps):
        sel = zipf_selections(batch, num_chunks, top_k, num_kv_heads, zipf_s, gen)
        counts += torch.bincount(sel.chunk.long(), minlength=num_chunks)
    replicated = base.with_replicas(counts.tolist(), slots_per_rank)
    totals = {
        name: {"selections": [0] * num_ranks, "rows": [0] * num_ranks}
        for name in ("by_id", "replicated")
    }
    worst = {"by_id": 0.0, "replicated": 0.0}
    for _ in range(steps):
        sel = zipf_selections(batch, num_chunks, top_k, num_kv_heads, zipf_s, gen)
        for name, placement in (("by_id", base), ("replicated", replicated)):
            loads = rank_loads(sel, batch, placement)
            for key in ("selections", "rows"):
                totals[name][key] = [a + b for a, b in zip(totals[name][key], loads[key])]
            per = loads["selections"]
            worst[name] = max(worst[name], max(per) / (sum(per) / num_ranks))
    report = {
        "config": {
            "chunks": num_chunks, "shared_ranks": num_ranks, "batch": batch, "top_k": top_k,
            "kv_heads": num_kv_heads, "zipf_s": zipf_s, "slots_per_rank": slots_per_rank,
            "profile_steps": profile_steps, "steps": steps,
        },
        "replicas": {c: list(hs) for c, hs in enumerate(replicated.holders) if len(hs) > 1},
    }  # fmt: skip
    for name, t in totals.items():
        sels = [x / steps for x in t["selections"]]
        report[name] = {
            "selections_per_rank_per_step": [round(x, 1) for x in sels],
            "rows_per_rank_per_step": [round(x / steps, 1) for x in t["rows"]],
            "imbalance_mean_step": round(max(sels) / (sum(sels) / num_ranks), 3),
            "imbalance_worst_step": round(worst[name], 3),
        }
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--slots", type=int, default=4, help="replica slots per shared rank")
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args(argv)
    print(
        json.dumps(
            load_report(
                a.chunks, a.ranks, a.batch, a.top_k, a.kv_heads, a.zipf_s, a.slots, steps=a.steps
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
