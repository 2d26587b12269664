"""The serving benchmark's summary object and plot (`moska.bench.serve`)."""

from __future__ import annotations

import argparse
import json
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
            out.update(phase_ratios(pattern, r, p))
        t = run("routed_tiered", pattern)
        if r and t:  # (e) the library 4x the GPU budget vs (c) all resident, same run
            out[f"{pattern}_routed_tiered_vs_routed_bf16_output_tok_s"] = (
                t["output_tokens_per_s"] / r["output_tokens_per_s"]
            )
            a, b = (x.get("phases") or {} for x in (t, r))
            if a.get("decode_output_tokens_per_s") and b.get("decode_output_tokens_per_s"):
                out[f"{pattern}_routed_tiered_vs_routed_bf16_decode_tok_s"] = (
                    a["decode_output_tokens_per_s"] / b["decode_output_tokens_per_s"]
                )
        for variant in VARIANTS:
            x = run(variant, pattern)
            if x:
                out[f"{pattern}_{variant}_output_tok_s"] = x["output_tokens_per_s"]
                out[f"{pattern}_{variant}_ttft_p50_s"] = x["ttft_p50_s"]
                out[f"{pattern}_{variant}_ttft_p99_s"] = x["ttft_p99_s"]
                out[f"{pattern}_{variant}_tpot_p50_s"] = x["tpot_p50_s"]
                ph = x.get("phases") or {}
                for key in ("decode_output_tokens_per_s", "full_batch_decode_step_p50_s"):
                    out[f"{pattern}_{variant}_{key}"] = ph.get(key)
                out[f"{pattern}_{variant}_prefill_phase_s"] = ph.get("prefill_seconds")
                for tier, counts in (x.get("tiers") or {}).items():
                    if isinstance(counts, dict):
                        out[f"{pattern}_{variant}_{tier}_hit_rate"] = counts["hit_rate"]
    if s.prefix_fits:
        out["baseline_arithmetic"] = baseline_arithmetic(args, s, run)
    out["peak_gpu_memory_gib"] = {r["variant"]: r.get("peak_gpu_memory_gib") for r in rows}
    out["not_run"] = {
        r["variant"]: f"{r['status']}: {r.get('reason')}" for r in rows if r["status"] != "ok"
    }
    return out


def phase_ratios(pattern: str, r: dict, p: dict) -> dict:
    """Routed bf16 (r) over prefix-cached (p) in the decode phase (serve_steps), and the
    most the whole-run ratio could be were routed decode free: the baseline's run over
    the routed run's prefill phase."""
    rp, pp = r.get("phases"), p.get("phases")
    if not rp or not pp:
        return {}
    out = {}
    a, b = rp["decode_output_tokens_per_s"], pp["decode_output_tokens_per_s"]
    if a and b:
        out[f"{pattern}_routed_bf16_vs_prefix_cached_decode_tok_s"] = a / b
    a, b = rp["full_batch_decode_step_p50_s"], pp["full_batch_decode_step_p50_s"]
    if a and b:
        out[f"{pattern}_routed_bf16_vs_prefix_cached_full_batch_decode_tok_s"] = b / a
        out[f"{pattern}_routed_full_batch_step_for_20x_s"] = b / 20  # the target
    if rp["prefill_seconds"] > 0:
        out[f"{pattern}_whole_run_ratio_bound_if_routed_decode_were_free"] = (
            p["seconds"] / rp["prefill_seconds"]
        )
    return out


HBM_READ_BYTES_PER_S = 4.0e12  # the H200's measured read rate (bench/results ceilings)


def baseline_arithmetic(args, s, run) -> dict:
    """What the prefix-cached baseline's decode step should cost from its attention reads
    (every request reads the whole prefix's KV each step), against what it measured."""
    read = args.requests * s.library_tokens * s.kv_bytes_per_token
    out: dict = {
        "attention_read_bytes_per_decode_step": read,
        "decode_step_s_at_4_0_tb_s": read / HBM_READ_BYTES_PER_S,
    }
    for pattern in args.arrivals:
        p = run("prefix_cached", pattern)
        step = ((p or {}).get("phases") or {}).get("full_batch_decode_step_p50_s")
        if step:
            out[f"{pattern}_full_batch_decode_step_s"] = step
            out[f"{pattern}_effective_read_bytes_per_s"] = read / step
    out["note"] = (
        "an effective read rate above HBM's means requests reading the same prefix blocks "
        "at the same time hit L2: the baseline is faster than its read volume says"
    )
    return out


def plot(rows: list[dict], path: Path, title: str | None = None) -> str:
    """Output tokens/s and TTFT p50 per variant and arrival pattern; says why if skipped."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "skipped: no variant ran"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    patterns = sorted({x["arrivals"] for r in ok for x in r["runs"]})
    fig, axes = plt.subplots(1, 2, figsize=(6 + 0.8 * len(ok), 4.5))
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
        ax.set_xticklabels([r["variant"] for r in ok], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title or f"moska serve benchmark, library of {ok[0]['library_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_files(paths: list[Path], out: Path) -> str:
    """One plot of the rows of several serve JSONs (runs the device's budget kept apart): each
    bar named by its variant, and with more than one file by its model's layers and file."""
    rows, names = [], []
    for path in paths:
        d = json.loads(path.read_text())
        layers, tag = d["shapes"]["layers"], path.stem.removeprefix("serve_")
        sh = d["shapes"]
        names.append(
            f"{tag}: {layers} layers, {sh['library_tokens']:,} tokens, B = {sh['requests']}"
        )
        for r in d["rows"]:
            label = r["variant"] if len(paths) == 1 else f"{r['variant']}\n{layers}L {tag}"
            rows.append({**r, "variant": label})
    return plot(rows, out, "moska serve benchmark, 8B dims\n" + "; ".join(names))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="plot serve benchmark JSONs (moska.bench.serve)")
    ap.add_argument("jsons", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="the PNG")
    args = ap.parse_args(argv)
    print(plot_files(args.jsons, args.out))


if __name__ == "__main__":
    main()
