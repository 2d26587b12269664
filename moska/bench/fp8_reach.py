"""Is issue 16's FP8 attention target reachable? Floors and times of grouped shared attention
over an e4m3 library against bf16, one routed decode step at Llama-3.1-8B dims (Hq 32, Hkv 8,
D 128), a 1M-token library of 4,096-token chunks, top-8, B = 1,024 / 256 / 64.

Per B, every ceiling measured in this run (`bandwidth.measure_ceilings`, `fp8_probes`):
  read floor     distinct bytes (K, V once per touched chunk, per-token K scales, q and o)
                 / the best read-only stream;
  tensor floor   the QK^T and PV FLOPs / the bf16 GEMM rate (bf16), / the e4m3 `_scaled_mm`
                 rate (FP8; q in two e4m3 terms: 1.5x the FLOPs, two QK^T products);
  softmax floor  the scores (query rows x keys) / the online-softmax probe's rate (FMA, row
                 max, exp2, row sum per score; the faster of fp32 exp2 and f16 exp2 two per
                 instruction): work FP8 does not shrink.
The floor is their max; the target (1.6x bf16 tokens/s) needs FP8 in bf16's time / 1.6, so
it is unreachable by measurement when the FP8 floor is above that. `no_overlap_ms` (tensor +
softmax floors) is what a program pays that cannot run its softmax beside its products (no
FA3 ping-pong): an estimate, not a floor. The times: `fp8_attention.run_batch` (every
variant and tile checked against the fp32 reference first, CUDA graphs), bf16 at its best
of several tiles; then the compiled programs' registers, spills and PTX counts.

    python -m moska.bench.fp8_reach [--batch 1024 256 64] [--variants ...] [--out FILE]
    python -m moska.bench.fp8_reach --cpu-dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

if "--cpu-dry-run" in sys.argv:  # before Triton is imported: its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.bench import fp8_attention as fa
from moska.bench.bandwidth import measure_ceilings
from moska.bench.common import environment, write_json
from moska.bench.floors import attention_flops
from moska.bench.fp8_attention_report import QUALITY_KEPT
from moska.bench.fp8_probes import kernel_stats, measure_fp8_ceilings
from moska.kernels.shared_attention_fp8 import _grouped_fp8_mma_kernel
from moska.kernels.shared_attention_kernel import _grouped_shared_attention_kernel

TARGET = 1.6
ENGINE_TILE = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3}


def tile(spec: str) -> dict[str, int]:
    """'64,128,4,3' -> block_m, block_n, num_warps, num_stages."""
    m, n, w, st = (int(x) for x in spec.split(","))
    return {"block_m": m, "block_n": n, "num_warps": w, "num_stages": st}


def floors(
    s: fa.Shape,
    b: int,
    touched: int,
    ceil: dict,
    bf16_ms: float | None,
    fastest_ms: float | None = None,
) -> dict:
    """The read, tensor and softmax floors (ms) of bf16 and of the FP8 programs at batch b.
    A softmax floor above `fastest_ms` (the fastest variant timed at b: every variant does
    that work) is no floor: the probe then ran slower than the kernels, and it is left out."""
    g = s.hq // s.hkv
    rows = b * s.hkv * s.top_k * g  # query rows, each over one chunk's keys
    scores = rows * s.chunk
    flops = attention_flops(rows, s.chunk, s.d)
    q_out = (b * s.hq + rows) * s.d * 2  # q read, o written, bf16
    kv = touched * s.chunk * s.hkv * s.d * 2  # K and V elements of the touched chunks
    # FP8: K's per-token fp32 scales read; V's per 128-row block (1/128 of that, counted)
    fp8_bytes = kv + touched * s.chunk * s.hkv * 4 * (1 + 1 / 128) + q_out
    read = ceil["read_bytes_per_s"]
    fp8_rate = ceil.get("fp8_gemm_flops_per_s")
    # the faster of the probe's two exp2 forms (fp32, f16 two per instruction)
    rates = [ceil.get(k) for k in ("softmax_scores_per_s", "softmax_f16_exp2_scores_per_s")]
    soft = max((r for r in rates if r), default=None)
    soft_ms = scores / soft * 1e3 if soft else None
    out: dict[str, Any] = {"query_rows": rows, "scores": scores, "flops": flops}
    if soft_ms is not None and fastest_ms is not None and soft_ms > fastest_ms:
        out["softmax_floor_rejected"] = {"softmax_floor_ms": soft_ms, "fastest_ms": fastest_ms}
        soft_ms = None

    def one(nbytes: float, tensor_ms: float | None) -> dict:
        f = {"read_floor_ms": nbytes / read * 1e3, "tensor_floor_ms": tensor_ms}
        f["softmax_floor_ms"] = soft_ms
        parts = {k: v for k, v in f.items() if v is not None}
        f["floor_ms"] = max(parts.values())
        f["bound"] = max(parts, key=lambda k: parts[k]).removesuffix("_floor_ms")
        if tensor_ms is not None and soft_ms is not None:
            f["no_overlap_ms"] = tensor_ms + soft_ms
        f["bytes"] = nbytes
        return f

    out["bf16"] = one(kv * 2 + q_out, flops / ceil["gemm_flops_per_s"] * 1e3)
    t8 = flops / fp8_rate * 1e3 if fp8_rate else None
    out["fp8_one_term_q"] = one(fp8_bytes, t8)
    out["fp8_q_split"] = one(fp8_bytes, None if t8 is None else 1.5 * t8)
    if bf16_ms is not None:
        need = bf16_ms / TARGET
        out["target_ms"] = need
        for k in ("fp8_one_term_q", "fp8_q_split"):
            out[k]["target_reachable"] = out[k]["floor_ms"] <= need
            out[k]["floor_vs_bf16_max_speedup"] = bf16_ms / out[k]["floor_ms"]
    return out


def q_rotation(s: fa.Shape, b: int) -> dict:
    """{q_rotation_ms}: q @ R at batch b (a library with Hadamard-rotated K: the launcher's
    one extra matmul before the grouped kernel, `q_rotation`), a CUDA graph; {} on CPU."""
    if s.device != "cuda":
        return {}
    from moska.bench.kernels_util import bench_graph
    from moska.library.fp8 import hadamard

    q = torch.randn(b, s.hq, s.d, device=s.device, dtype=s.dtype)
    rot = hadamard(s.d).to(s.device, s.dtype)
    return {"q_rotation_ms": bench_graph(lambda: torch.matmul(q, rot))}


def row_floors(s: fa.Shape, row: dict, names: list[str], ceil: dict) -> dict:
    """`floors` of a timed row (bf16's time and the fastest variant's from the row)."""
    times = [row[n]["ms"] for n in names if n in row]
    bf16_ms = row["bf16"]["ms"] if "bf16" in row else None
    return floors(s, row["batch"], row["chunks_touched"], ceil, bf16_ms, min(times, default=None))


def summarize(rows: list[dict], names: list[str], ceil: dict) -> dict:
    """Per B: bf16 ms, each variant's speedup, the quality-kept best, floors and verdicts."""
    out: dict[str, Any] = {"target": f"FP8 >= {TARGET}x bf16 tokens/s at B = 1,024"}
    per_b = []
    for r in rows:
        ms = {n: round(r[n]["ms"], 4) for n in names if n in r}
        e: dict[str, Any] = {"batch": r["batch"], "ms": ms}
        e["tiles"] = {n: r[n]["tile"] for n in names if n in r}
        if "bf16" in ms:
            e["speedup"] = {n: round(ms["bf16"] / t, 3) for n, t in ms.items() if n != "bf16"}
            kept = {n: t for n, t in ms.items() if n in QUALITY_KEPT}
            if kept:
                best = min(kept, key=lambda n: kept[n])
                e["quality_kept_best"] = best
                e["quality_kept_speedup"] = round(ms["bf16"] / ms[best], 3)
        if "q_rotation_ms" in r and "fp8_mma_vt_block" in ms and "bf16" in ms:
            # K rotated, K and V per block, one-term q: quality kept on the quality model
            # (bench/results/fp8_quality_rot_chunk.json): the block program + q's rotation
            t = ms["fp8_mma_vt_block"] + r["q_rotation_ms"]
            e["rotated_block_ms"] = round(t, 4)
            e["rotated_block_speedup"] = round(ms["bf16"] / t, 3)
        fl = r["floors"]
        e["floors_ms"] = {
            k: {x: round(fl[k][x], 4) for x in ("read_floor_ms", "tensor_floor_ms",
                                                "softmax_floor_ms", "floor_ms")
                if fl[k].get(x) is not None}
            for k in ("bf16", "fp8_one_term_q", "fp8_q_split")
        }  # fmt: skip
        if "target_ms" in fl:
            e["target_ms"] = round(fl["target_ms"], 4)
            e["q_split_target_reachable_by_floors"] = fl["fp8_q_split"]["target_reachable"]
            e["q_split_max_speedup_at_floor"] = round(
                fl["fp8_q_split"]["floor_vs_bf16_max_speedup"], 3
            )
        per_b.append(e)
    out["by_batch"] = per_b
    out["ceilings"] = {k: v for k, v in ceil.items() if isinstance(v, float)}
    big = max(rows, key=lambda r: r["batch"]) if rows else None
    if big is not None and "target_ms" in big["floors"]:
        f = big["floors"]
        out["verdict_at_largest_batch"] = (
            "reachable by floors (the kernel misses it)"
            if f["fp8_q_split"]["target_reachable"]
            else "unreachable by measurement: the FP8 floor is above bf16's time / 1.6"
        )
    out["correct"] = all(
        r["correctness"][n]["ok"] for r in rows for n in names if n in r["correctness"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 256, 64])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[
            "fp8_mma_qsplit_vt_vb",
            "fp8_mma_qsplit_vt_vb_ex16",
            "fp8_mma_vt_vb",
            "fp8_mma_vt_vb_ex16",
            "fp8_mma_vt_block",
            "fp8_mma_vt_block_ex16",
            "fp8_mma_vt_chunk",
        ],
    )
    ap.add_argument("--tiles", nargs="+", default=["64,128,4,3"], help="m,n,warps,stages")
    ap.add_argument(
        "--wide-tiles-for",
        nargs="*",
        default=["fp8_mma_qsplit_vt_vb"],
        help="variants timed on every --tiles entry (the others: the first only)",
    )
    ap.add_argument("--bf16-tiles", nargs="*", default=["128,128,8,3", "64,128,4,3"])
    ap.add_argument("--sample", type=int, default=4)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default="bench/results/fp8_reach.json")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        s, batches = fa.DRY, [8, 4]
        tiles = [{"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}]
        bf16_tiles: list[dict[str, Any]] = [{}]
        args.out = args.out.replace(".json", "_cpu_dry_run.json")
        fa.TOL.update({n: 0.15 for n in fa.MMA})
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --cpu-dry-run)")
        s, batches = fa.gpu_shape(256, 8), args.batch
        tiles = [tile(t) for t in args.tiles]
        bf16_tiles = [{}, *(tile(t) for t in args.bf16_tiles)]
        fa.CHECK_TILE.update(ENGINE_TILE)
    mma_tiles = {n: tiles if n in args.wide_tiles_for else tiles[:1] for n in args.variants}
    names = ["bf16", *[n for n in dict.fromkeys(args.variants) if n in fa.MMA]]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pools = fa.make_pools(s)
    ceil = measure_ceilings(s.device, gib=4.0 if s.device == "cuda" else 0.01)
    ceil.update(measure_fp8_ceilings(s.device))
    fa.log(f"ceilings: { {k: v for k, v in ceil.items() if isinstance(v, float)} }")
    rows: list[dict] = []

    def write(done: bool) -> dict:
        payload = {
            "what": "FP8 grouped shared attention: floors (measured ceilings) and times vs bf16",
            "shape": {**vars(s), "dtype": str(s.dtype)},
            "library_tokens": s.chunk * s.chunks,
            "ceilings": ceil,
            **environment(argv),
            "rows": rows,
            "summary": {**summarize(rows, names, ceil), "complete": done},
        }
        write_json(args.out, payload)
        return payload

    for b in batches:  # the JSON rewritten after each batch: a run cut short keeps its rows
        row = fa.run_batch(s, b, "uniform", names, bf16_tiles, gen, pools, args.sample, ceil,
                           mma_tiles)  # fmt: skip
        row["floors"] = row_floors(s, row, names, ceil)
        row.update(q_rotation(s, b))
        rows.append(row)
        write(False)
    stats = kernel_stats(_grouped_fp8_mma_kernel, _grouped_shared_attention_kernel)
    payload = write(True)
    payload["kernel_stats"] = stats
    write_json(args.out, payload)
    fa.log(f"wrote {args.out}: {payload['summary']}")
    return 0 if payload["summary"]["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
