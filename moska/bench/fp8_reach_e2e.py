"""Issue 16's end-to-end FP8 target (decode >= 1.3x bf16 at B = 256) against what FP8 can
change: the grouped kernel's share of the step (the router, the paged attention, the GEMMs
and the rest are the same kernels in both modes). With the grouped kernel at the FP8 read
floor (its bytes at the read bandwidth measured in the `fp8_reach` run of the same device
call) and every other kernel family at its bf16 time, the step cannot be faster than

    bound = step_bf16 - grouped_bf16 + grouped_fp8_floor,   max speedup = step_bf16 / bound

(an Amdahl bound from the `--profile` ms by kernel family of `moska.bench.fp8_decode`). Adds
`end_to_end` to the fp8_reach JSON's summary and prints the short table of both.

    python -m moska.bench.fp8_reach_e2e REACH_JSON DECODE_JSON [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moska.bench.common import write_json

E2E_TARGET = 1.3


def grouped_fp8_floor_ms(shape: dict, batch: int, layers: int, read_bps: float) -> float:
    """Bytes of one step's grouped kernels over an FP8 library at 8B dims (Hq 32, Hkv 8, D
    128; per-token K scales, V per block) at `read_bps`: every chunk touched (B x top-k x
    Hkv selections over the library's chunks: at B = 256 all are), q read and o written."""
    hq, hkv, d = 32, 8, 128
    chunks = shape["library_tokens"] // shape["chunk_size"]
    touched = min(chunks, batch * shape["top_k"])
    kv = touched * shape["chunk_size"] * hkv * (2 * d + 4 * (1 + 1 / 128))
    rows = batch * hkv * shape["top_k"] * (hq // hkv)
    q_out = (batch * hq + rows) * d * 2
    return layers * (kv + q_out) / read_bps * 1e3


def end_to_end(reach: dict, decode: dict, layers: int) -> dict:
    read = reach["ceilings"]["read_bytes_per_s"]
    rows = {r["mode"]: r for r in decode["rows"] if "step_ms" in r}
    if "bf16" not in rows:
        return {"error": "the decode JSON has no bf16 row"}
    bf = rows["bf16"]
    out: dict[str, Any] = {"target": f"end-to-end FP8 decode >= {E2E_TARGET}x bf16 at B = 256"}
    out["step_ms"] = {m: round(r["step_ms"], 3) for m, r in rows.items()}
    out["speedup"] = {m: round(bf["step_ms"] / r["step_ms"], 3) for m, r in rows.items()}
    ks = bf.get("kernel_ms") or {}
    if "grouped" not in ks:
        out["error"] = "no --profile ms by kernel family: no bound"
        return out
    floor = grouped_fp8_floor_ms(decode["shape"], bf["batch"], layers, read)
    bound = bf["step_ms"] - ks["grouped"] + floor
    out.update(
        bf16_kernel_ms=ks,
        fp8_grouped_ms={m: r.get("kernel_ms", {}).get("grouped") for m, r in rows.items()},
        fp8_grouped_read_floor_ms=round(floor, 3),
        step_bound_ms=round(bound, 3),
        max_speedup_fp8_can_give=round(bf["step_ms"] / bound, 3),
        layers=layers,
        read_bytes_per_s=read,
    )
    out["reachable"] = bf["step_ms"] / bound >= E2E_TARGET
    return out


def refloor(reach: dict) -> None:
    """Every row's floors and the summary again, from the JSON's own rows and ceilings."""
    from moska.bench import fp8_attention as fa
    from moska.bench.fp8_reach import row_floors, summarize

    sh = dict(reach["shape"])
    sh["dtype"] = None  # (floors use sizes only)
    s = fa.Shape(**sh)
    names = ["bf16", *[n for n in reach["rows"][0] if n in fa.MMA]]
    for row in reach["rows"]:
        row["floors"] = row_floors(s, row, names, reach["ceilings"])
    keep = {k: v for k, v in reach["summary"].items() if k in ("complete", "end_to_end")}
    reach["summary"] = {**summarize(reach["rows"], names, reach["ceilings"]), **keep}


def table(summary: dict) -> str:
    lines = ["B     bf16 ms  best FP8 (quality kept)        x bf16  FP8 floor (q split)  target"]
    for e in summary.get("by_batch", []):
        best = e.get("quality_kept_best", "-")
        f = e["floors_ms"]["fp8_q_split"]
        lines.append(
            f"{e['batch']:<5} {e['ms'].get('bf16', float('nan')):7.3f}  {best:<29} "
            f"{e.get('quality_kept_speedup', float('nan')):6.3f}  {f['floor_ms']:7.3f} "
            f"({'/'.join(k[0] for k in f if k != 'floor_ms')})  {e.get('target_ms', 0):7.3f}"
        )
    for e in summary.get("by_batch", []):
        if "rotated_block_ms" in e:
            lines.append(
                f"B={e['batch']}: rotated K + block scales (one-term q) {e['rotated_block_ms']:.3f}"
                f" ms incl. q rotation = {e['rotated_block_speedup']:.3f}x bf16"
            )
    e2e = summary.get("end_to_end")
    if e2e and "step_bound_ms" in e2e:
        lines.append(
            f"end to end B=256: speedups {e2e['speedup']}; bound at the FP8 read floor "
            f"{e2e['max_speedup_fp8_can_give']}x (reachable: {e2e['reachable']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reach")
    ap.add_argument("decode", nargs="?")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument(
        "--refloor",
        action="store_true",
        help="recompute every row's floors and the summary from the JSON's rows and ceilings "
        "(`fp8_reach.floors`, e.g. after a fix to how a floor is judged)",
    )
    args = ap.parse_args(argv)
    reach = json.loads(Path(args.reach).read_text())
    if args.refloor:
        refloor(reach)
        write_json(args.reach, reach)
    if args.decode and Path(args.decode).exists():
        decode = json.loads(Path(args.decode).read_text())
        e2e = end_to_end(reach, decode, args.layers)
        reach["summary"]["end_to_end"] = {**e2e, "decode_json": args.decode}
        write_json(args.reach, reach)
    print(table(reach["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
