"""Summary, printed table and suggested tuning-table entries of a
`moska.bench.kernels_shapes_variants` run (its points in, plain dicts out)."""

from typing import Any

from moska.bench.kernels_shapes import table_entries

READ_TARGET = 0.75  # issue 22: the kernel alone >= 0.75 of its read floor at B = 1,024


def _fastest(ms: dict[str, float]) -> tuple[str | None, float | None]:
    if not ms:
        return None, None
    name = min(ms, key=lambda k: ms[k])
    return name, ms[name]


def _fractions(pt: dict, ms: float | None, prefix: str) -> dict:
    if not ms:
        return {}
    return {
        f"{prefix}_floor_fraction": round(pt["floor_ms"] / ms, 3),
        f"{prefix}_read_floor_fraction": round(pt["read_floor_ms"] / ms, 3),
        # the share of the matmul peak measured in the run (where FLOPs bind, not bytes)
        f"{prefix}_matmul_fraction": round(pt["compute_floor_ms"] / ms, 3),
    }


def summary(points: list[dict]) -> dict:
    """Per point: the table's tile and the fastest correct variant (ms, floor fractions),
    wrong or failing variants; single-chunk points also the best SDPA baseline and
    ours / baseline speedups (> 1: ours faster)."""
    out: dict[str, Any] = {"missing": [], "wrong": []}
    for pt in points:
        key = f"{pt['case']}_D{pt['D']}_G{pt['G']}_B{pt['B']}"
        if pt["case"] == "grouped" and "routing" in pt:
            key += f"_{pt['routing']}"
        if "missing" in pt:
            out["missing"].append(key)
            continue
        out["wrong"] += [f"{key} {n}: {e}" for n, e in pt["errors"].items() if "skipped" not in e]
        ms = pt["ms"]
        table = next((n for n in pt["relerr_vs_ref"] if n.startswith("table:")), None)
        best, best_ms = _fastest(ms)
        row: dict[str, Any] = {"bound": pt["bound"], "floor_ms": round(pt["floor_ms"], 4)}
        row["read_target_reachable"] = pt["compute_floor_ms"] <= pt["read_floor_ms"] / READ_TARGET
        row |= {"table": table, "table_ms": ms.get(table), **_fractions(pt, ms.get(table), "table")}
        row |= {"best": best, "best_ms": best_ms, **_fractions(pt, best_ms, "best")}
        if best_ms and ms.get(table):
            row["best_speedup_vs_table"] = round(ms[table] / best_ms, 3)
        if "l2" in pt:  # tiles a group and the L2 stream they make (grouped points)
            row |= {"table_l2": pt["l2"].get(table), "best_l2": pt["l2"].get(best)}
        if "baselines" in pt:
            bname, bms = _fastest(pt["baselines"]["ms"])
            row |= {"baseline": bname, "baseline_ms": bms}
            if bms and best_ms:
                row["best_speedup_vs_baseline"] = round(bms / best_ms, 3)
            if bms and ms.get(table):
                row["table_speedup_vs_baseline"] = round(bms / ms[table], 3)
        out[key] = row
    return out


def l2_reads(group_rows, tunings: dict, chunk_bytes: int, ms: dict) -> dict:
    """Per variant: the row tiles its work list makes (ceil(rows / block_m) a group) and the
    chunk bytes those tiles stream from L2 per ms (every tile of a group reads the chunk's
    K/V; HBM serves each chunk once). `group_rows`: the query rows of each non-empty (chunk,
    KV head) group (a tensor). Why: at 128 +- 22 rows a group, 64-row tiles make ~2.45 tiles
    a group whose 2 MB reads alone took the kernel's time at ~6.5 TB/s of L2 (session 13's
    softmax-overlap run, docs/performance-notes.md)."""
    out: dict[str, Any] = {}
    for name, t in tunings.items():
        tiles = int(((group_rows + t["block_m"] - 1) // t["block_m"]).sum())
        row = {"tiles": tiles, "tiles_per_group": round(tiles / max(1, group_rows.numel()), 3)}
        if ms.get(name):
            row["l2_TBps"] = round(tiles * chunk_bytes / ms[name] / 1e9, 3)
        out[name] = row
    return out


def suggested_table(points: list[dict]) -> list[dict]:
    """TuneEntry fields per (D, G): the variant with the least summed time over the
    routings of each grouped B (timed and correct at every routing), keyed by the B's rows
    per group (kernels_shapes.table_entries)."""
    by: dict[tuple[int, int, int], list[dict]] = {}
    for pt in points:
        if pt["case"] == "grouped" and "missing" not in pt:
            by.setdefault((pt["D"], pt["G"], pt["B"]), []).append(pt)
    best: dict[tuple[int, int], list[dict]] = {}
    for (d, g, _b), pts in sorted(by.items()):
        names = [n for n in pts[0]["ms"] if all(n in p["ms"] for p in pts)]
        if not names:
            continue
        name = min(names, key=lambda n: sum(p["ms"][n] for p in pts))
        entry = {"rows_per_group": pts[0]["rows"], "tuning": pts[0]["tunings"][name]}
        best.setdefault((d, g), []).append(entry)
    return [e for (d, g), b in sorted(best.items()) for e in table_entries(d, g, b)]


def print_summary(s: dict) -> None:
    """One line per point: the table's and the best variant's ms and read/floor fractions."""
    print(
        f"{'point':34} {'table ms':>9} {'rd/fl/mm':>16} {'best ms':>9} {'rd/fl/mm':>16} best / base"
    )
    for key, r in s.items():
        if not isinstance(r, dict):
            continue

        def fr(prefix: str, r: dict = r) -> str:
            a, b = r.get(f"{prefix}_read_floor_fraction"), r.get(f"{prefix}_floor_fraction")
            c = r.get(f"{prefix}_matmul_fraction")
            return f"{a or 0:.2f}/{b or 0:.2f}/{c or 0:.2f}"

        base = ""
        if r.get("best_l2"):
            base = (
                f"tiles/grp {r['best_l2']['tiles_per_group']} L2 {r['best_l2'].get('l2_TBps')} TB/s"
            )
        if "baseline" in r:
            base = f"{r['baseline']} {r.get('baseline_ms') or 0:.4f} x{r.get('best_speedup_vs_baseline')}"
        print(
            f"{key:34} {r.get('table_ms') or 0:9.4f} {fr('table'):>16} {r.get('best_ms') or 0:9.4f}"
            f" {fr('best'):>16} {r.get('best')} {base}"
        )
    for k in ("missing", "wrong"):
        if s.get(k):
            print(k, s[k][:12])
