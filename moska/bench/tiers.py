"""Decode steps over a tiered library vs the same library all-resident, in one run.

The attention path of a decode step at Llama-3.1-8B dims (32 layers, 32 query heads, 8 KV
heads, d = 128, bf16): per layer the batch's routed selections -> grouped shared attention
(all-resident: the library's pools; tiered: `ChunkTiers.attend`, misses copied from pinned
CPU memory on a copy stream, next-layer prefetch) -> an MLP-sized GEMM pair standing in for
the rest of the layer (`--no-mlp` leaves it out). Routing is synthetic so that its skew is
controlled: B requests each read k chunks, kept from step to step except that each is
redrawn with probability `--churns` (each value a run) and a request is replaced after
a geometric lifetime (`moska/bench/tier_eviction.py`'s trace), chunk popularity uniform or
Zipf(s);
each layer sees the trace under its own permutation of the chunk ids. Output tokens/s =
B x steps / time; `summary` gives each tiered mode's ratio to all-resident, its GPU hit
rate, the bytes it moved per step and (skip) the share of selections it left out.

    python -m moska.bench.tiers --out bench/results/tiers.json            # H200
    python -m moska.bench.tiers --cpu-dry-run --out /tmp/tiers_dry.json   # tiny, CPU
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from moska.bench.common import environment, write_json
from moska.bench.tier_biased import run_biased
from moska.bench.tier_eviction import zipf_probs
from moska.bench.tier_floor import floor, h2d_bytes_per_s, needed
from moska.bench.tier_schedule import run_affinity
from moska.kernels.selections import from_topk
from moska.library.chunk_store import MemoryChunks
from moska.library.tier_affinity import AffinityConfig
from moska.library.tiers import ChunkTiers, TierConfig

DRY = {
    "layers": 2, "hq": 4, "hkv": 2, "d": 16, "chunk_len": 64, "chunks": 16, "batch": 8,
    "top_k": 2, "steps": 3, "warmup": 1, "mlp_dim": 64, "hidden": 32,
}  # fmt: skip


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp-dim", type=int, default=14336)
    ap.add_argument("--no-mlp", action="store_true", help="attention path only")
    ap.add_argument("--chunk-len", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=48, help="48 x 4096 tokens = 24 GiB at 8B dims")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--resident", type=float, default=0.25, help="share of chunks in GPU slots")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dists", default="zipf1.0,uniform")
    ap.add_argument(
        "--churns",
        default="0.05,0.7",
        help="per-step redraw probabilities (0.7: a layer keeps 0.31 of its chunks from one "
        "step to the next on moska-code-20m, bench/results/tier_prefetch_study.json)",
    )
    ap.add_argument("--lifetime", type=float, default=256.0, help="mean steps of a request")
    ap.add_argument(
        "--modes",
        default="lfu-wait,lru-wait,lfu-skip,allhit-wait,affinity-wait,biased1.0-wait",
        help="allhit: the tiered path with every chunk in a slot (its overhead alone); "
        "a '-step' suffix: TierConfig(sync='step') (skip: sync-free, misses fetched from "
        "counts read once per step); affinity: the chunk-affinity scheduler (moska/library/tier_affinity.py); biased<p>: "
        "residency-biased routing moving a share p of non-resident selections "
        "(moska/bench/tier_biased.py)",
    )
    ap.add_argument("--max-wait", type=int, default=8, help="affinity: steps a request waits")
    ap.add_argument("--swap-every", type=int, default=4, help="biased: steps between swaps")
    ap.add_argument(
        "--swap-chunks", type=int, default=0,
        help="affinity: chunks fetched per step (0: resident step time x H2D / chunk bytes)",
    )  # fmt: skip
    ap.add_argument("--prefetch", default="next_layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.cpu_dry_run:
        for k, v in DRY.items():
            setattr(a, k, v)
    return a


def selections(a, dist: str, churn: float, device) -> list[list]:
    """Per step (warmup + steps), per layer: Selections of the batch."""
    rng = np.random.default_rng(a.seed + 1)
    perms = [torch.from_numpy(rng.permutation(a.chunks)) for _ in range(a.layers)]
    out = []
    rows = _rows(a, dist, churn)
    for chosen in rows:
        t = torch.from_numpy(chosen)  # [B, k]
        per_layer = []
        for p in perms:
            idx = p[t].unsqueeze(1).to(device)  # [B, 1, k]
            per_layer.append(from_topk(idx, a.hkv, a.chunks))
        out.append(per_layer)
    return out


def _rows(a, dist: str, churn: float) -> list[np.ndarray]:
    """The trace's per-request chunk choices [B, k] at each step."""
    rng = np.random.default_rng(a.seed)
    probs = None
    if dist != "uniform":
        probs = zipf_probs(a.chunks, float(dist[4:]), rng)

    def draw(n):
        return rng.choice(a.chunks, size=n, p=probs)

    def distinct(row: np.ndarray) -> np.ndarray:
        # a request reads k distinct chunks (from_topk's contract: a repeated chunk id
        # in a row leaves selections unwritten on the GPU): redraw the repeats
        seen: set[int] = set()
        for j, c in enumerate(row):
            while int(c) in seen:
                c = draw(1)[0]
            row[j] = c
            seen.add(int(c))
        return row

    chosen = np.stack([distinct(draw(a.top_k)) for _ in range(a.batch)])
    steps = []
    for _ in range(a.warmup + a.steps):
        redraw = rng.random(chosen.shape) < churn
        chosen[redraw] = draw(int(redraw.sum()))
        for b in np.nonzero(rng.random(a.batch) < 1.0 / a.lifetime)[0]:
            chosen[b] = draw(a.top_k)
        for row in chosen:
            distinct(row)
        steps.append(chosen.copy())
    return steps


def run_mode(a, mode, sels, pools, tiers, ops, device, mlp) -> dict:
    """Times warmup + steps decode steps of `mode` ("resident" or a tiered one)."""
    dtype = pools["k"][0].dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    q = torch.randn(a.batch, a.hq, a.d, generator=g).to(device, dtype)
    offsets = pools["offsets"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sm_scale = a.d**-0.5
    total = kept = 0
    t0 = None
    check = float("nan")  # a "wait" mode's first read against the all-resident kernel
    for step, per_layer in enumerate(sels):
        if step == a.warmup:
            if tiers is not None:
                tiers.flush()  # the warmup's counts settled (waits for the device)
            sync()
            t0 = time.perf_counter()
            if tiers is not None:
                base = {k: dict(v) for k, v in tiers.stats.as_dict().items() if isinstance(v, dict)}
                skipped0 = tiers.stats.skipped
        x = None
        for layer, sel in enumerate(per_layer):
            if tiers is None:
                ops.grouped_shared(q, pools["k"][layer], pools["v"][layer], offsets, sel, sm_scale)
                n_kept = sel.req.numel()
            else:
                o, _, s2 = tiers.attend(ops, layer, q, sel, sm_scale)
                n_kept = s2.req.numel()
                if step == layer == 0 and tiers.config.miss_policy == "wait":  # exact: check
                    ref, _ = ops.grouped_shared(q, pools["k"][0], pools["v"][0], offsets, sel,
                                                sm_scale)  # fmt: skip
                    check = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
            if step >= a.warmup:
                total += sel.req.numel()
                kept += n_kept
            if mlp is not None:
                w1, w2, h = mlp
                x = torch.nn.functional.silu(h @ w1)[:, : w2.shape[0]] @ w2
    sync()
    assert t0 is not None  # set at the first timed step
    seconds = time.perf_counter() - t0
    if tiers is not None:
        tiers.flush()  # counts of the last steps (sync-free reads settle once per step)
    out = {"mode": mode, "seconds": seconds, "tokens_per_s": a.batch * a.steps / seconds}
    if tiers is not None:
        out["check_rel_err_vs_resident"] = check
        st = tiers.stats.as_dict()
        hits = st["hits"]["gpu"] - base["hits"]["gpu"]
        misses = st["misses"]["gpu"] - base["misses"]["gpu"]
        out.update(
            gpu_hit_rate=hits / max(1, hits + misses),
            gpu_misses_per_step=misses / a.steps,
            gpu_bytes_per_step=(st["bytes_in"]["gpu"] - base["bytes_in"]["gpu"]) / a.steps,
            skipped_share=(tiers.stats.skipped - skipped0) / max(1, total),
        )
    # (a sync-free skip returns every selection, the absent ones read as empty)
    out["selections_kept_share"] = kept / max(1, total) - out.get("skipped_share", 0.0) * (
        kept == total
    )
    del x
    return out


def _summary(rows, workloads, a, h2d: float, chunk_bytes: float) -> dict:
    """Per workload: each tiered mode's ratio to all-resident, with the floor PCIe allows at
    its measured bytes per step (tier_floor.py), and what 0.8x would need."""
    summary: dict[str, Any] = {"h2d_gib_per_s": h2d / 2**30}
    for dist in workloads:
        base = next(r for r in rows if r["dist"] == dist and r["mode"] == "resident")
        t_res = base["seconds"] / a.steps
        allhit = next((r for r in rows if r["dist"] == dist and r["mode"] == "allhit-wait"), None)
        t_over = allhit["seconds"] / a.steps if allhit else 0.0
        demanded = base["demanded_chunks_per_step"] * chunk_bytes
        modes = {}
        for r in rows:
            if r["dist"] != dist or r["mode"] == "resident":
                continue
            m = modes[r["mode"]] = {
                "ratio_vs_resident": r["tokens_per_s"] / base["tokens_per_s"],
                "gpu_hit_rate": r["gpu_hit_rate"],
                "gpu_gib_per_step": r["gpu_bytes_per_step"] / 2**30,
                "selections_kept_share": r["selections_kept_share"],
                "floor_ratio": floor(t_res, r["gpu_bytes_per_step"], h2d, t_over),
            }
            for key in ("tpot_s", "max_gap_steps", "requests_per_step", "routing_stability",
                        "check_rel_err_vs_resident", "moved_share", "sync_free_layer_share",
                        "host_remap_s"):  # fmt: skip
                if key in r:
                    m[key] = r[key]
        summary[dist] = {
            "resident_tokens_per_s": base["tokens_per_s"],
            "resident_step_s": t_res,
            "demanded_chunks_per_step": base["demanded_chunks_per_step"],
            "for_0.8x": needed(0.8, t_res, h2d, demanded),
            **modes,
        }
    return summary


def main(argv=None) -> dict:
    a = parse(argv)
    device = torch.device("cpu" if a.cpu_dry_run else "cuda")
    dtype = torch.float32 if a.cpu_dry_run else torch.bfloat16
    from moska.kernel_ops import kernel_ops

    ops = kernel_ops("torch" if a.cpu_dry_run else "triton")
    S = a.chunks * a.chunk_len
    offs = [i * a.chunk_len for i in range(a.chunks + 1)]
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    # the library on CPU (pinned on CUDA) and all-resident on the device
    cpu: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    dev: dict[str, Any] = {
        "k": [],
        "v": [],
        "offsets": torch.tensor(offs, dtype=torch.int32, device=device),
    }
    torch.manual_seed(a.seed)
    for _ in range(a.layers):
        for key in ("k", "v"):
            t = torch.randn(S, a.hkv, a.d, device=device, dtype=dtype)  # made on the device
            host = torch.empty(t.shape, dtype=dtype, pin_memory=device.type == "cuda")
            cpu[key].append(host.copy_(t))
            dev[key].append(t)
    mlp = None
    if not a.no_mlp:
        w1 = torch.randn(a.hidden, 2 * a.mlp_dim, generator=g).to(device, dtype) * 0.01
        w2 = torch.randn(a.mlp_dim, a.hidden, generator=g).to(device, dtype) * 0.01
        h = torch.randn(a.batch, a.hidden, generator=g).to(device, dtype)
        mlp = (w1, w2, h)
    slots = max(1, int(a.chunks * a.resident))
    elt = 2 if dtype == torch.bfloat16 else 4
    kv_bytes = 2 * S * a.hkv * a.d * elt * a.layers
    chunk_bytes = kv_bytes / a.chunks  # one chunk, every layer
    h2d = h2d_bytes_per_s(device, (1 << 30) if device.type == "cuda" else (1 << 22))
    print(f"H2D {h2d / 2**30:.1f} GiB/s")
    rows: list[dict] = []
    result: dict = {}
    workloads = [f"{d}/churn{c}" for d in a.dists.split(",") for c in a.churns.split(",")]
    for dist in workloads:
        name, churn = dist.split("/churn")
        sels = selections(a, name, float(churn), device)
        demand = np.mean([len(np.unique(r)) for r in _rows(a, name, float(churn))[a.warmup :]])
        base = run_mode(a, "resident", sels, dev, None, ops, device, mlp)
        rows.append({"dist": dist, "demanded_chunks_per_step": float(demand), **base})
        print({"dist": dist, "mode": "resident", "tokens_per_s": round(base["tokens_per_s"])})
        t_res = base["seconds"] / a.steps
        for mode in a.modes.split(","):
            eviction, miss, *sync = mode.split("-")  # "<eviction>-<miss>[-step]"
            n_slots = a.chunks if eviction == "allhit" else slots
            policy = eviction if eviction in ("lru", "lfu") else "lfu"
            cfg = TierConfig(gpu_budget="1", eviction=policy, miss_policy=miss,
                             prefetch=a.prefetch, sync=sync[0] if sync else "layer")  # fmt: skip
            tiers = ChunkTiers(offs, MemoryChunks(cpu["k"], cpu["v"]), cfg, device, n_slots, 1)
            if eviction == "allhit":  # every chunk in its slot before the first step
                for layer in range(a.layers):
                    tiers.prefetch(layer, list(range(a.chunks)))
            if eviction == "affinity":
                swap = a.swap_chunks or min(slots, max(1, int(t_res * h2d / chunk_bytes)))
                acfg = AffinityConfig(max_wait=a.max_wait, swap_chunks=swap)
                r = run_affinity(a, name, float(churn), tiers, ops, device, mlp, acfg, dev)
            elif eviction.startswith("biased"):  # residency-biased routing, its share
                steps_rows = _rows(a, name, float(churn))
                r = run_biased(a, steps_rows, float(eviction[6:]), tiers, ops, device, mlp,
                               a.swap_every, a.swap_chunks or 2, dev)  # fmt: skip
            else:
                r = run_mode(a, mode, sels, dev, tiers, ops, device, mlp)
            rows.append({"dist": dist, **r})
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            del tiers
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done = workloads[: workloads.index(dist) + 1]  # written after each workload
        result = _result(a, argv, device, dtype, S, kv_bytes, slots, rows,
                         _summary(rows, done, a, h2d, chunk_bytes))  # fmt: skip
    return result


def _result(a, argv, device, dtype, S, kv_bytes, slots, rows, summary) -> dict:
    result = {
        "benchmark": "tiers",
        "environment": environment(None if argv is None else ["moska.bench.tiers", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "shapes": {
            "layers": a.layers,
            "hq": a.hq,
            "hkv": a.hkv,
            "d": a.d,
            "chunk_len": a.chunk_len,
            "chunks": a.chunks,
            "library_tokens": S,
            "library_gib": kv_bytes / 2**30,
            "gpu_slots_per_layer": slots,
            "batch": a.batch,
            "top_k": a.top_k,
            "mlp": None if a.no_mlp else [a.hidden, a.mlp_dim],
        },
        "config": vars(a),
        "rows": rows,
        "summary": summary,
        "notes": "tiered steps run eagerly (no CUDA graphs); routing is a synthetic trace "
        "(uniform / Zipf chunk popularity, per-step churn), not the key-max router",
    }
    if a.out:
        write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
