"""The last lines of bench/device_session17_fp8.sh: FP8 attention (ms and x bf16 per variant,
the fastest variant whose quality meets top-1 >= 0.99), end-to-end decode and serve (e).

Usage: python bench/device_session17_fp8_summary.py ATTENTION.json DECODE.json SERVE.json
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"no {path}: {e}"[:200])
        return None


def attention(d: dict) -> None:
    s = d["summary"]
    ceil = d["ceilings"]
    print(
        "attention correct", s["correct"], "complete", s["complete"], "| read GB/s",
        round(ceil["read_bytes_per_s"] / 1e9), "gemm TF/s", round(ceil["gemm_flops_per_s"] / 1e12),
    )  # fmt: skip
    for r in d["rows"]:
        for n, e in r["correctness"].items():
            if not e.get("ok", True):
                print("NOT OK", r["batch"], n, {k: v for k, v in e.items() if k != "ok"})
        for n in [k for k in r if k.endswith("_errors")]:
            print("ERR", r["batch"], n, [e[:120] for e in r[n]][:2])
    short = {"fp8_mma_": "", "qsplit_vt": "qs", "_vt": "vt"}
    for e in s["by_batch"]:
        ms = e["ms"]
        cells = []
        for n, t in ms.items():
            name = n
            for a, b in short.items():
                name = name.replace(a, b)
            x = f" {ms['bf16'] / t:.2f}x" if n != "bf16" else ""
            cells.append(f"{name} {t:.3f}{x}")
        print(f"B={e['batch']}: " + ", ".join(cells))
        if "quality_kept_best" in e:
            print(
                f"  quality kept: {e['quality_kept_best']} {e['quality_kept_vs_bf16']}x bf16, "
                f"of floor {e['quality_kept_of_floor']}"
            )
    for r in d["rows"]:
        tiles = {n[:-11]: min(v.values()) for n, v in r.items() if n.endswith("_ms_by_tile")}
        best = {n: r[n]["tile"].replace("'", "")[:60] for n in tiles if n in r}
        print(f"B={r['batch']} best tiles:", best)


def decode(d: dict) -> None:
    for r in d["rows"]:
        print("decode", r["mode"], round(r["step_ms"], 2), "ms", r.get("kernel_ms"))
    print("decode summary", d.get("summary"))


def serve(d: dict) -> None:
    s = d.get("summary", {})
    keep = ("_vs_", "hit_rate", "output_tok_s", "tpot_p50", "not_run", "library_tokens")
    print(
        "serve complete",
        d.get("complete"),
        {k: v for k, v in s.items() if any(x in k for x in keep)},
    )
    for r in d.get("rows", []):
        if r["variant"] == "routed_tiered" and r.get("status") == "ok":
            print(
                "tiered:",
                {k: r.get(k) for k in ("library_gib", "library_gpu_budget_gib", "gpu_slots")},
            )


def main() -> None:
    for path, fn in zip(sys.argv[1:], (attention, decode, serve)):
        d = load(path)
        if d is not None:
            try:
                fn(d)
            except (KeyError, TypeError, ZeroDivisionError) as e:
                print(f"{path}: unexpected shape: {e!r}"[:200])


if __name__ == "__main__":
    main()
