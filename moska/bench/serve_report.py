"""The serving benchmark's summary object and plot (`moska.bench.serve`)."""

from __future__ import annotations

from pathlib import Path

# in the order run: the summary's two first; tiers last (they save the library to disk)
VARIANTS = ("routed_bf16", "prefix_cached", "all_chunks", "routed_fp8", "routed_tiered")


def summarize(rows: list[dict], args, s) -> dict:
    """Per arrival pattern: routed bf16 over prefix-cached output tokens/s, and every
    variant's output tokens/s and TTFT p50/p99; which variants did not run and why."""

    def run(variant: str, pattern: str) -> dict | None:
        row = next((r for r in rows if r["variant"] == variant and r["status"] == "ok"), None)
        if row is None:
            return None
        return next((x for x in row["runs"] if x["arrivals"].split("@")[0] == pattern), None)

    out: dict = {
        "batch": args.requests,
        "library_tokens": s.library_tokens,
        "prefix_cached_library_tokens": s.library_tokens if s.prefix_fits else None,
        "prefix_cached_library_limit": s.library_limit,
    }
    for pattern in args.arrivals:
        r, p = run("routed_bf16", pattern), run("prefix_cached", pattern)
        if r and p:
            out[f"{pattern}_routed_bf16_vs_prefix_cached_output_tok_s"] = (
                r["output_tokens_per_s"] / p["output_tokens_per_s"]
            )
        for variant in VARIANTS:
            x = run(variant, pattern)
            if x:
                out[f"{pattern}_{variant}_output_tok_s"] = x["output_tokens_per_s"]
                out[f"{pattern}_{variant}_ttft_p50_s"] = x["ttft_p50_s"]
                out[f"{pattern}_{variant}_ttft_p99_s"] = x["ttft_p99_s"]
                out[f"{pattern}_{variant}_tpot_p50_s"] = x["tpot_p50_s"]
                for tier, counts in (x.get("tiers") or {}).items():
                    if isinstance(counts, dict):
                        out[f"{pattern}_{variant}_{tier}_hit_rate"] = counts["hit_rate"]
    out["peak_gpu_memory_gib"] = {r["variant"]: r.get("peak_gpu_memory_gib") for r in rows}
    out["not_run"] = {
        r["variant"]: f"{r['status']}: {r.get('reason')}" for r in rows if r["status"] != "ok"
    }
    return out


def plot(rows: list[dict], path: Path) -> str:
    """Output tokens/s and TTFT p50 per variant and arrival pattern; says why if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "skipped: no variant ran"
    patterns = sorted({x["arrivals"] for r in ok for x in r["runs"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(patterns)
    for j, pattern in enumerate(patterns):
        xs = [i + j * width for i in range(len(ok))]
        runs: list[dict] = [
            next((x for x in r["runs"] if x["arrivals"] == pattern), {}) for r in ok
        ]
        axes[0].bar(xs, [x.get("output_tokens_per_s") or 0 for x in runs], width, label=pattern)
        axes[1].bar(xs, [x.get("ttft_p50_s") or 0 for x in runs], width, label=pattern)
    for ax, label in zip(axes, ("output tokens/s", "TTFT p50 (s)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ok))])
        ax.set_xticklabels([r["variant"] for r in ok], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"moska serve benchmark, library of {ok[0]['library_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
