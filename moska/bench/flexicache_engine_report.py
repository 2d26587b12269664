"""The summary of `moska.bench.flexicache_engine_speed`: tokens/s and GPU KV per row, and
FlexiCache's largest batch against full KV's in one GPU KV budget."""

from __future__ import annotations

from typing import Any


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s and GPU KV per row; FlexiCache's largest batch against full KV's in the
    same budget (`equal_budget`) and GPU KV saved at full KV's batch."""
    key = {id(r): f"{r['row']}:{'fit=' if r['fit'] else ''}{r['batch']}" for r in rows}
    out: dict[str, Any] = {
        "tokens_per_s": {key[id(r)]: r["tokens_per_s"] for r in rows},
        "gpu_kv_gib_peak": {key[id(r)]: r["gpu_kv_gib_peak"] for r in rows},
        "preemptions": {key[id(r)]: r["preemptions"] for r in rows},
    }
    full = [r for r in rows if r["row"] == "full"]
    base = max(full, key=lambda r: r["batch"]) if full else None
    if base is None:
        return out
    out["full_batch"] = base["batch"]
    out["speedup_vs_full"] = {
        key[id(r)]: r["tokens_per_s"] / base["tokens_per_s"] for r in rows if r is not base
    }
    same = [r for r in rows if r["row"] == "deferred" and r["batch"] == base["batch"]]
    if same:
        out["gpu_kv_saved_equal_batch"] = 1 - same[0]["gpu_kv_blocks_peak"] / max(
            base["gpu_kv_blocks_peak"], 1
        )
    for name in ("deferred", "shared", "default"):  # the largest batch in full KV's budget
        fit = [r for r in rows if r["fit"] and r["row"] == name]
        if not fit or fit[0]["budget_blocks"] != base["budget_blocks"]:
            continue
        f = fit[0]
        out["equal_budget" + ("" if name == "deferred" else f"_{name}")] = {
            "budget_blocks": base["budget_blocks"], "budget_gib": base["budget_gib"],
            "full_batch": base["batch"], "flexicache_batch": f["batch"],
            "full_tokens_per_s": base["tokens_per_s"], "flexicache_tokens_per_s":
            f["tokens_per_s"], "speedup": f["tokens_per_s"] / base["tokens_per_s"],
            "full_gpu_kv_gib_peak": base["gpu_kv_gib_peak"],
            "flexicache_gpu_kv_gib_peak": f["gpu_kv_gib_peak"],
            "both_within_budget": max(base["gpu_kv_blocks_peak"], f["gpu_kv_blocks_peak"])
            <= base["budget_blocks"], "preemptions": base["preemptions"] + f["preemptions"],
        }  # fmt: skip
    return out


def stability(flexi, churn: float) -> dict[str, Any]:
    """How the row's heads became stable: a random model's rankings churn nearly all of a
    head's top-K per re-ranking (overlap ~K / pages, far below any threshold), so the bench
    forces a share of (layer, KV head) pairs stable with churned rankings (`ChurnScores`);
    the others keep the random model's own rankings and the row's threshold classifies
    them (threshold 2: never stable)."""
    forced = flexi.force_stable
    return {
        "kv_heads": flexi.num_layers * flexi.num_kv_heads,
        "forced_stable": int(forced.sum()) if forced is not None else 0,
        "threshold": flexi.cfg.threshold,
        "churn_of_forced": churn,
        "stable_fraction_measured": flexi.stats()["stable_fraction"],
        "handling": "forced (layer, KV head) pairs stable with the churn hook's rankings; "
        "the rest ranked by the random model (no churn bonus) and classified by the "
        "threshold",
    }
