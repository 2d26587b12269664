"""The one-chunk bench's summary (moska/bench/kernels_one_chunk.py): per point the floor, the
best Triton variant, the dispatcher and the baselines, with paired ratios over the timing
rounds; the ONE_CHUNK table the run measured; the table printed last.

Why paired ratios: compute-bound calls of several ms drifted by up to 20 % between two
rounds of the same call on the H200 (session 16b: the graph-replayed cuDNN call at D 128 G 8
B 1,024 took 6.43 and 7.69 ms), so a ratio of two calls' best rounds can be off by that
much. Each round times every call once, in a rotated order; `*_paired` is the median over
rounds of (baseline's time in that round / ours in that round): the two were timed close
together, so a clock that drifts moves both."""

import statistics
from typing import Any

from moska.bench.floors import floor_ms


def _best(ms: dict, prefix: str = "") -> tuple[str | None, float]:
    got = {k: v for k, v in ms.items() if k.startswith(prefix)}
    if not got:
        return None, float("nan")
    k = min(got, key=lambda k_: got[k_])
    return k, got[k]


def point_summary(pt: dict, bw: float, peak: float) -> dict:
    """Floor, best Triton variant, the launcher, and two baselines: `baseline` the fastest
    F.scaled_dot_product_attention call (flash / cuDNN, graph or eager, no LSE: the
    libraries' best case) and `baseline_lse` the fastest SDPA call that also returns the LSE
    (what a merge with other parts needs; `sdpa_one_chunk`). `*_vs_*`: baseline time / ours
    (> 1: ours faster)."""
    fl = floor_ms(pt["bytes"], pt["flops"], bw, peak)
    out: dict[str, Any] = {"bound": fl["bound"], "floor_ms": round(fl["floor_ms"], 4)}
    t_name, t_ms = _best(pt["ms"], "triton:")
    b_name, b_ms = _best(pt["baselines"]["ms"])
    l_name, l_ms = _best(pt["ms"], "sdpa:")
    ours = {"triton": (t_name, t_ms), "dispatch": ("dispatch", pt["ms"].get("dispatch"))}
    if b_name:
        out |= {"baseline": b_name, "baseline_ms": round(b_ms, 4)}
    if l_name:
        out |= {"baseline_lse": l_name, "baseline_lse_ms": round(l_ms, 4)}
    for who, (name, ms) in ours.items():
        if name is None or ms is None:
            continue
        out |= {f"{who}_ms": round(ms, 4), f"{who}_floor_fraction": round(fl["floor_ms"] / ms, 3)}
        if who == "triton":
            out["triton_best"] = name
        if b_name:
            out[f"{who}_vs_baseline"] = round(b_ms / ms, 3)
        if l_name:
            out[f"{who}_vs_baseline_lse"] = round(l_ms / ms, 3)
    out["dispatch_backend"] = pt["dispatch_backend"]
    same = "sdpa:" + pt["dispatch_backend"] if pt["dispatch_backend"] != "triton" else None
    if same is None:
        same = next((k for k in pt["ms"] if k.startswith("triton:table:")), None)
    for key, prefix in (("baseline", "base:"), ("baseline_lse", "sdpa:")):
        r = paired(pt, "dispatch", prefix)
        if r is not None:
            out[f"dispatch_vs_{key}_paired"] = r
    if same is not None and paired(pt, "dispatch", same) is not None:
        out["dispatch_same_call"] = same  # the call the dispatcher makes, timed directly
        out["dispatch_vs_same_call_paired"] = paired(pt, "dispatch", same)
    return out


def paired(pt: dict, ours: str, prefix: str) -> float | None:
    """Median over the timing rounds of (the fastest call named `prefix`* in that round, or
    the call named exactly `prefix` / `ours` in that round); None without rounds of both."""
    rounds = pt.get("rounds_ms", {})
    mine = rounds.get(ours)
    if prefix in rounds:  # one call by its exact name
        others = [rounds[prefix]]
    else:
        others = [v for k, v in rounds.items() if k.startswith(prefix) and k != ours]
    if not mine or not others:
        return None
    n = min(len(mine), *(len(o) for o in others))
    return round(statistics.median(min(o[i] for o in others) / mine[i] for i in range(n)), 3)


def one_chunk_table(points: list[dict]) -> list[dict]:
    """ONE_CHUNK entries: per (D, G), each measured B takes the faster of the best Triton
    variant and the best SDPA call with LSE (as the launcher makes it; with timing rounds,
    the faster by the median of their per-round ratios); an entry starts at
    each measured point where the choice changes (rows between two points keep the lower
    one's choice)."""
    by_shape: dict[tuple[int, int], list[dict]] = {}
    for p in points:
        by_shape.setdefault((p["D"], p["G"]), []).append(p)
    out = []
    for (d, g), pts in sorted(by_shape.items()):
        prev = None
        for p in sorted(pts, key=lambda p_: p_["rows"]):
            t_name, t_ms = _best(p["ms"], "triton:")
            s_name, s_ms = _best(p["ms"], "sdpa:")
            faster = s_name is not None and s_ms < t_ms
            if s_name and t_name and p.get("rounds_ms"):  # round by round, where timed so
                faster = (paired(p, t_name, s_name) or 1.0) < 1.0  # sdpa / triton < 1
            choice = s_name[5:] if s_name and faster else "triton"
            if choice != prev:
                rows = 0 if prev is None else p["rows"]
                out.append({"head_dim": d, "gqa": g, "min_rows": rows, "backend": choice})
                prev = choice
    return out


def print_table(summ: dict) -> None:
    """One line per point: floor, best Triton, best baselines (no LSE / with LSE), the
    launcher's backend and time, its ratio to each baseline and its floor fraction."""
    print(
        "D   G B    bound floor  triton  base(noLSE)        LSE     dispatch      x_base x_lse frac"
        "  x_lse_pair x_same_pair"
    )
    nan = float("nan")
    for key, s in summ.items():
        if not isinstance(s, dict) or "floor_ms" not in s:
            continue
        d, g, b = (key.split("_")[i][1:] for i in range(3))
        print(
            f"{d:<3} {g:<1} {b:<4} {s['bound'][:4]:<5} {s['floor_ms']:<6.3f} "
            f"{s.get('triton_ms', nan):<7.3f} {s.get('baseline', '-')[:11]:<11} "
            f"{s.get('baseline_ms', nan):<6.3f} {s.get('baseline_lse_ms', nan):<7.3f} "
            f"{s['dispatch_backend'][:6]:<6} {s.get('dispatch_ms', nan):<6.3f} "
            f"{s.get('dispatch_vs_baseline', nan):<6.3f} "
            f"{s.get('dispatch_vs_baseline_lse', nan):<5.3f} "
            f"{s.get('dispatch_floor_fraction', nan):.3f} "
            f"{s.get('dispatch_vs_baseline_lse_paired', nan):<10.3f} "
            f"{s.get('dispatch_vs_same_call_paired', nan):.3f}"
        )
