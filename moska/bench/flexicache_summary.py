"""The FlexiCache speed bench's summary (`flexicache_speed.py`): full KV's strongest row
against FlexiCache at the largest batch, wall and device-bound, and one line per re-rank
interval measured (`--also-r`; `d`: deferred re-ranking)."""

from __future__ import annotations


def summarize(full, full2, flex_eq, flex_max, no_hyst, other, budget, graph=None) -> dict:
    fulls = [r for r in (full, full2, graph) if r is not None]
    base = max(fulls, key=lambda r: r["tokens_per_s"])  # the strongest by the wall clock
    dev_rows = [r for r in fulls if r["device_bound_step_ms"]]
    base_dev = min(dev_rows, key=lambda r: r["device_bound_step_ms"]) if dev_rows else None

    def dev_tps(r):  # tokens/s at the row's device-bound step time (None: not probed)
        ms = r and r["device_bound_step_ms"]
        return ms and round(r["batch"] / ms * 1e3, 1)

    tps_full_dev, tps_flex_dev = dev_tps(base_dev), dev_tps(flex_max)
    dev_speedup = tps_full_dev and tps_flex_dev and round(tps_flex_dev / tps_full_dev, 3)
    return {
        "gpu_kv_saved_equal_batch": round(1 - flex_eq["gpu_kv_bytes"] / full["gpu_kv_bytes"], 4),
        "batch_full": full["batch"],
        "batch_flexicache": flex_max["batch"],
        "flexicache_fits_budget": flex_max["gpu_kv_bytes"] <= budget,
        "full_step_ms_first_and_repeat": [full["step_ms"], full2["step_ms"]],
        "full_row_wall": base["row"],
        "tokens_per_s_full": base["tokens_per_s"],
        "tokens_per_s_full_graph_wall": graph and graph["tokens_per_s"],
        "tokens_per_s_flexicache_largest_batch": flex_max["tokens_per_s"],
        "speedup_largest_batch": round(flex_max["tokens_per_s"] / base["tokens_per_s"], 3),
        "full_row_device_bound": base_dev and base_dev["row"],
        "tokens_per_s_device_bound_full": tps_full_dev,
        "tokens_per_s_device_bound_flexicache": tps_flex_dev,
        "speedup_device_bound": dev_speedup or None,
        "rerank_device_probed": "rerank" in flex_max["device_ms_by_kind"],
        "fetch_bytes_per_step_largest_batch": flex_max["fetch_bytes_per_step"],
        "fetch_share_of_step_largest_batch": flex_max["fetch_share_of_step"],
        "refetched_share_of_fetches": round(
            flex_max["refetched_pages_timed"] / max(flex_max["fetched_pages_timed"], 1), 4
        ),
        "fetched_pages_hysteresis_vs_off": no_hyst
        and [flex_max["fetched_pages_timed"], no_hyst["fetched_pages_timed"]],
        "tokens_per_s_hysteresis_off": no_hyst and no_hyst["tokens_per_s"],
        "step_ms_by_kind_largest_batch": flex_max["step_ms_by_kind"],
        "device_ms_by_kind_largest_batch": flex_max["device_ms_by_kind"],
        "host_issue_ms_median_largest_batch": flex_max["host_issue_ms_median"],
        "host_syncs_per_step_by_kind_largest_batch": flex_max["host_syncs_per_step_by_kind"],
        "speedup_compare_churn": other
        and {
            "churn": other["churn"],
            "speedup": round(other["tokens_per_s"] / base["tokens_per_s"], 3),
        },
        "note": "stable heads forced (random model); quality: flexicache_quality_*.json."
        " tokens/s: mean over whole lcm(r, block size) periods of steps (plain, page start,"
        " re-ranking in their real proportion); full: the fastest of its rows (eager twice,"
        " CUDA graph); device-bound: every row and step kind timed on the device alone"
        " (re-ranking steps: an upper bound, see flexicache_timing.py), full KV's best row",
    }


def by_interval(row: dict, summary: dict) -> dict:
    """A FlexiCache row at the largest batch against the full-KV figures of the summary."""
    full, full_dev = summary["tokens_per_s_full"], summary["tokens_per_s_device_bound_full"]
    dev = row["device_bound_step_ms"] and round(row["batch"] / row["device_bound_step_ms"] * 1e3)
    return {"tokens_per_s": row["tokens_per_s"], "speedup": round(row["tokens_per_s"] / full, 3),
            "tokens_per_s_device_bound": dev,
            "speedup_device_bound": dev and full_dev and round(dev / full_dev, 3),
            "step_ms_by_kind": row["step_ms_by_kind"], "device_ms_by_kind": row["device_ms_by_kind"],
            "graph_captures": row["graph_captures"]}  # fmt: skip
