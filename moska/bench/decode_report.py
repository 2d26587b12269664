"""The decode benchmark's report: the routed step's floor, the summary, the plot, a profile.

The floor of a routed step (`step_floor`) counts what the step must read and compute: the
weights once, the library KV of the (chunk, KV head) pairs the router picked (per-KV-head
routing reads a chunk only for the heads that chose it), every request's unique KV, and
the router's own reads and FLOPs (moska/bench/floors.py `router_cost`: key-max reads every
chunk's low-rank keys and computes one logit per (query head, key) of every request, at
the index's real rank); FLOPs add the weights' 2 per parameter per token and attention.
"""

from __future__ import annotations

import torch

from moska.bench.floors import router_cost


def step_floor(
    *,
    batch: int,
    cfg,  # the model config: num_layers, num_heads, num_kv_heads, head_dim
    n_params: int,
    library_tokens: int,
    chunk_size: int,
    unique_tokens: int,
    top_k: int,
    scorer: str,
    rank: int,
    touched_chunk_heads: int,
    ceilings: dict,
    shortlist_factor: int = 4,
) -> dict:
    """{roofline_ms, bytes, flops, router_bytes, router_flops} of one moska decode step
    (bf16 weights and KV). Two-stage's shortlisted chunks are counted as all chunks (an
    upper bound on its key reads; at B >= 64 nearly every chunk is on some shortlist)."""
    L, hq, hkv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    head_token = 2 * d * 2  # K and V of one KV head and one token, bf16
    lib_bytes = touched_chunk_heads * chunk_size * head_token * L
    uniq_bytes = batch * (unique_tokens + 1) * hkv * head_token * L
    C = library_tokens // chunk_size
    r_bytes = r_flops = 0
    if scorer in ("keymax", "two_stage", "mean"):
        r_bytes, r_flops = router_cost(
            scorer, batch, hq, hkv, d, C, chunk_size, rank, C, shortlist_factor * top_k
        )
        r_bytes, r_flops = r_bytes * L, r_flops * L
    attn = 4 * batch * hq * d * L * (top_k * chunk_size + unique_tokens + 1)
    nbytes = n_params * 2 + lib_bytes + uniq_bytes + r_bytes
    flops = 2 * n_params * batch + attn + r_flops
    t_mem = nbytes / ceilings["read_bytes_per_s"]
    t_flop = flops / ceilings["gemm_flops_per_s"]
    return {
        "roofline_ms": 1e3 * max(t_mem, t_flop),
        "roofline_bound": "compute" if t_flop > t_mem else "read",
        "floor_bytes": nbytes,
        "floor_flops": flops,
        "router_bytes": r_bytes,
        "router_flops": r_flops,
    }


def profile_step(step, out: str) -> None:
    """Print and save the CUDA kernels of one moska step, most time first."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table, flush=True)
    Path(out).with_suffix(".profile.txt").write_text(table)


def summarize(rows: list[dict], build: dict | None) -> dict:
    """Speedups at B = 256 (or the largest B) for the modes that ran; the moska step's time
    and floor fraction at every B."""

    def get(b, mode):
        return next((r for r in rows if r["batch"] == b and r["mode"] == mode), None)

    b = 256 if get(256, "moska") else max(r["batch"] for r in rows)
    m = get(b, "moska")
    out: dict = {"batch": b}
    if m is None:
        return out
    for key, mode in (
        ("speedup_vs_dense_b256", "dense"),
        ("speedup_routing_vs_all_chunks_b256", "all"),
        ("overlap_speedup_vs_serial_b256", "serial"),
    ):
        other = get(b, mode)
        if other is not None:
            out[key] = other["step_ms"] / m["step_ms"]
    if get(b, "capped"):
        out["keymax_capped_vs_default_b256"] = m["step_ms"] / get(b, "capped")["step_ms"]
    out["roofline_fraction_b256"] = m["roofline_fraction"]
    out["decode_tokens_per_s_b256"] = m["decode_tokens_per_s"]
    for r in rows:
        if r["mode"] == "moska":
            out[f"moska_step_ms_b{r['batch']}"] = r["step_ms"]
            out[f"moska_roofline_fraction_b{r['batch']}"] = r["roofline_fraction"]
    if build:
        out["library_build_mfu"] = build["mfu"]
    return out


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("moska", "all", "dense"):
        pts = [(r["batch"], r["decode_tokens_per_s"]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*pts), marker="o", label=mode)
    roof = sorted({(r["batch"], r["batch"] / (r["roofline_ms"] / 1e3)) for r in rows})
    ax.plot(*zip(*roof), linestyle="--", color="gray", label="roofline (moska)")
    ax.set_xlabel("concurrent requests B")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title("Decode at Llama-3.1-8B dims, 512K shared tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
