"""Grouped shared attention over an FP8 (e4m3) library against the same library in bf16:
one routed decode step's shared part at Llama-3.1-8B dims (Hq 32, Hkv 8, D 128), chunks of
4,096 tokens, top-8 chunks per request, B = 256 and 1,024.

Variants, each a CUDA graph (the decode step's form), in one run: bf16; e4m3 with per-(token,
KV head) scales as libraries store them, upcast in registers (`fp8`; `fp8_chunk`: per-chunk
scales); q cut to e4m3 per tile for an FP8 QK^T (`fp8_dot`); the FP8 tensor-core program
(`fp8_mma`, kernels/shared_attention_fp8.py: q per row and the weights in e4m3, no KV tile
upcast), V token-major (`_vt`), q as two e4m3 terms (`_qsplit`; the engine's
`--fp8-attention mma|mma_qsplit`), and the scale and A/B variants of `MMA` below. Each with
the launcher's default tile and alternatives (the best reported), against its floor: max(bytes
at the read bandwidth, the products at the bf16 GEMM rate, FP8 ones at twice it), both
measured in the run. Correctness first: every variant (and tile) vs the fp32 PyTorch
reference on a sample of requests; the run fails after writing its JSON if one is off.

Usage (GPU): python -m moska.bench.fp8_attention [--batch 256 1024] [--variants ...] [--out FILE]
CPU check of the harness (Triton interpreter, tiny shapes, fp16):
    python -m moska.bench.fp8_attention --cpu-dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

if "--cpu-dry-run" in sys.argv:  # before Triton is imported: its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.bench.bandwidth import measure_ceilings
from moska.bench.common import time_ms
from moska.bench.floors import attention_flops, floor_ms
from moska.bench.fp8_attention_report import report
from moska.bench.fp8_attention_variants import (
    AB_ONLY,
    MMA,
    MMA_COST,
    MMA_TILES,
    QUICK_MMA_TILES,
    QUICK_WIDE,
    TILES,
)
from moska.bench.kernels_util import bench_graph, rel
from moska.kernels import shared_attention_fp8 as sa8
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_attention_fp8_ref import e4m3, fp8_mma_ref, interpreter_e4m3
from moska.library.fp8 import quantize

# rel. error of o vs the reference (lse: a tenth). fp8_dot also cuts q to e4m3, an error of
# the size e4m3 KV itself brings (`fp8_values_vs_bf16_values`, ~0.04 on random data).
TOL = {"bf16": 1e-2, "fp8": 1e-2, "fp8_chunk": 1e-2, "fp8_dot": 1e-1}
# vs the dequantized library (the algorithm's own e4m3 error ~0.02 on random data; the CPU
# dry run's interpreter rounds some e4m3 casts wrongly: 0.15 there, set in main)
TOL.update({n: 5e-2 for n in MMA})


@dataclass(frozen=True)
class Shape:
    hq: int
    hkv: int
    d: int
    chunk: int
    chunks: int
    top_k: int
    dtype: torch.dtype
    device: str


def gpu_shape(chunks: int, top_k: int) -> Shape:
    return Shape(32, 8, 128, 4096, chunks, top_k, torch.bfloat16, "cuda")


DRY = Shape(4, 2, 64, 64, 8, 2, torch.float16, "cpu")


def routing(b: int, s: Shape, kind: str, gen: torch.Generator) -> torch.Tensor:  # [B, k] int
    """Each request's top-k chunks: uniform, or Zipf(1.0)-skewed chunk popularity."""
    w = torch.ones(s.chunks)
    if kind == "zipf":
        w = 1.0 / torch.arange(1, s.chunks + 1, dtype=torch.float32)
        w = w[torch.randperm(s.chunks, generator=gen)]
    idx = torch.multinomial(w.expand(b, -1), s.top_k, replacement=False, generator=gen)
    return idx.to(s.device)


def make_pools(s: Shape):
    rows = s.chunk * s.chunks
    k = torch.randn(rows, s.hkv, s.d, device=s.device).to(s.dtype)  # [S, Hkv, D]
    v = torch.randn(rows, s.hkv, s.d, device=s.device).to(s.dtype)
    offs = torch.arange(0, rows + 1, s.chunk, dtype=torch.int32, device=s.device)  # [C+1]
    # e4m3 as libraries store it (one scale per token and KV head), and per (chunk, KV head)
    q8: dict[str, Any] = {
        g: (quantize(k, offs, g), quantize(v, offs, g)) for g in ("token", "chunk", "block")
    }
    q8["v_t"] = q8["token"][1].data.permute(1, 2, 0).contiguous()  # [Hkv, D, S] token-major
    for g in ("chunk", "block"):
        q8[f"v_t_{g}"] = q8[g][1].data.permute(1, 2, 0).contiguous()
    return k, v, offs, q8


def variant_args(name: str, k, v, q8) -> tuple:
    """bf16; fp8 / fp8_dot: per-token scales (the library's); fp8_chunk: per-chunk scales."""
    if name == "bf16":
        return k, v, {}
    gran = "chunk" if "_chunk" in name else "block" if "_block" in name else "token"
    kg, vg = (gran, gran)  # _vb / _kb: V's (K's) scales per block, the other's per token
    if "_vb" in name or "_kb" in name:
        kg, vg = ("token", "block") if "_vb" in name else ("block", "token")
    kq, vq = q8[kg][0], q8[vg][1]
    if name in MMA:
        kw = {"kv_scales": (kq.scale, vq.scale), "fp8_mma": True, **MMA[name]}
        if kw.pop("v_t", False):  # read through TMA: run_batch sets use_tma
            kw["v_pool_t"] = q8["v_t" if vg == "token" else f"v_t_{vg}"]
        return kq.data, vq.data, kw
    return kq.data, vq.data, {"kv_scales": (kq.scale, vq.scale), "fp8_dot": name == "fp8_dot"}


CHECK_TILE: dict[str, Any] = {}  # the MMA variants' checked tile (main sets it)
_ALGO: dict[str, dict] = {}  # an fp8_mma variant's check against its algorithm, by name


def gsa(
    *args,
    raw_max: bool = True,
    token_v2: bool = True,
    qsplit_acc: bool = True,
    raw_max_token: bool = True,
    scale_sides: int = 3,
    sc_nomask: bool = False,
    ex2_f16: bool = False,
    **kw,
):
    """`grouped_shared_attention` with the FP8 program's RAW_MAX / TOKEN_V2 / QSPLIT_ACC /
    RAW_MAX_TOKEN / SCALE_SIDES / SC_NOMASK / EX2_F16 flags set for this call (module flags
    `fp8_mma_args` reads at launch: compile and graph capture see them)."""
    names: tuple[str, ...] = ("RAW_MAX", "TOKEN_V2", "QSPLIT_ACC", "RAW_MAX_TOKEN")
    names += ("SCALE_SIDES", "SC_NOMASK", "EX2_F16")
    before = [getattr(sa8, n) for n in names]
    flags = (raw_max, token_v2, qsplit_acc, raw_max_token, scale_sides, sc_nomask, ex2_f16)
    for n, x in zip(names, flags):
        setattr(sa8, n, x)
    try:
        return grouped_shared_attention(*args, **kw)
    finally:
        for n, x in zip(names, before):
            setattr(sa8, n, x)


def check(s: Shape, q, chunks_of, k, v, offs, q8, names, sample: int, refs=None) -> dict:
    """Rel. error of each variant vs the fp32 reference on the first `sample` requests;
    `refs` (a dict) gets each variant's (q, selections, o, lse) of that check."""
    qs = q[:sample].contiguous()
    sel = from_topk(chunks_of[:sample].view(sample, 1, -1), s.hkv, s.chunks)
    scale = s.d**-0.5
    ref_bf16 = grouped_shared_attention_ref(qs, k, v, offs, sel, scale)
    errs: dict[str, dict[str, Any]] = {}
    for name in names:
        kk, vv, kw = variant_args(name, k, v, q8)
        ro, rl = grouped_shared_attention_ref(
            qs, kk, vv, offs, sel, scale, kv_scales=kw.get("kv_scales")
        )
        if refs is not None:
            refs[name] = (qs, sel, ro, rl)
        if name == "fp8":  # what e4m3 KV itself changes (not a kernel error)
            errs["fp8_values_vs_bf16_values"] = {"o_rel_err": rel(ro, ref_bf16[0])}
        try:
            tma: dict[str, Any] = {"use_tma": True} if "v_pool_t" in kw else {}
            if name in MMA and CHECK_TILE:  # the tile the engine launches (--quick-tiles)
                tma.update(CHECK_TILE)
            o, lse = gsa(qs, kk, vv, offs, sel, scale, **kw, **tma)
        except Exception as e:  # noqa: BLE001 - reported in the JSON, the run goes on
            errs[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            continue
        errs[name] = {
            "o_rel_err": rel(o, ro),
            "lse_rel_err": rel(lse, rl),
            "ok": rel(o, ro) < TOL[name] and rel(lse, rl) < TOL[name] / 10,
        }
        if name in MMA:
            if name not in _ALGO:  # B-independent (one request, unsplit): the first batch's
                _ALGO[name] = vs_algorithm(s, qs[:1], chunks_of[:1], kk, vv, offs, kw)
            errs[name].update(_ALGO[name])
            errs[name]["ok"] &= mma_ok(errs[name])
    return errs


def vs_algorithm(s: Shape, q, chunks_of, kk, vv, offs, kw) -> dict:
    """An fp8_mma variant unsplit vs its own algorithm (`fp8_mma_ref`: the same e4m3 cuts of
    q and weights, blocks of 64 keys; on CPU with the interpreter's e4m3 rounding)."""
    sel = from_topk(chunks_of.view(1, 1, -1), s.hkv, s.chunks)
    scale = s.d**-0.5
    unsplit: dict[str, Any] = {"block_n": 64, "target_programs": 1, "min_split": 1 << 30}
    tma: dict[str, Any] = {"use_tma": True} if "v_pool_t" in kw else {}
    o, lse = gsa(q, kk, vv, offs, sel, scale, **kw, **tma, **unsplit)
    cast = e4m3 if s.device == "cuda" else interpreter_e4m3
    q_split, up = kw.get("fp8_q_split", False), 1.0 if kw.get("qsplit_acc", True) else 16.0
    ao, al = fp8_mma_ref(q, kk, vv, offs, sel, scale, kw["kv_scales"], 64, q_split, cast, up)
    ro, _ = grouped_shared_attention_ref(q, kk, vv, offs, sel, scale, kv_scales=kw["kv_scales"])
    return {
        "o_rel_err_vs_algorithm": rel(o, ao),
        "lse_rel_err_vs_algorithm": rel(lse, al),
        "unsplit_o_rel_err_vs_library": rel(o, ro),
        "algorithm_o_rel_err_vs_library": rel(ao, ro),
    }


def mma_ok(e: dict) -> bool:
    """An fp8_mma variant's kernel vs its algorithm. Not fp32-close: the weights are cut to
    e4m3 (2^-4 steps) after exp2 of scores that the GPU sums in another order (and Hopper's
    FP8 MMA accumulates with fewer bits than fp32), so weights on a rounding edge flip a
    step; fp8_mma_qsplit's two QK^T dots flip about twice as many (H200: 0.011 vs 0.0054
    for fp8_mma, while qsplit is the nearer to the library, 0.026 vs 0.037). So: within
    2e-2 of the algorithm, and at most 1.25x as far from the dequantized library as the
    algorithm itself (flips are independent of its error, so they add in quadrature:
    0.026 -> 0.028 for qsplit); a wrong scale or block moves o by 0.1 or more."""
    near = e["o_rel_err_vs_algorithm"] < 2e-2
    return near and e["unsplit_o_rel_err_vs_library"] <= 1.25 * e["algorithm_o_rel_err_vs_library"]


def tile_ok(name: str, tile: dict, times: dict, ref: tuple, args: tuple) -> bool:
    """A tile other than the launcher's default gives the checked requests' attention within
    the variant's tolerance (its error goes to `times`, a failure to `{name}_errors`)."""
    (qs, sel, ro, rl), (kk, vv, offs, kw, tkw) = ref, args
    try:
        o, lse = gsa(qs, kk, vv, offs, sel, qs.shape[-1] ** -0.5, **kw, **tkw)
        err = (rel(o, ro), rel(lse, rl))
    except Exception as e:  # noqa: BLE001 - a tile that fails to compile: reported
        times.setdefault(f"{name}_errors", []).append(f"{tile}: {type(e).__name__}: {e}"[:300])
        return False
    times.setdefault(f"{name}_tile_o_rel_err", {})[str(tile)] = err[0]
    if err[0] < TOL[name] and err[1] < TOL[name] / 10:
        return True
    times.setdefault(f"{name}_errors", []).append(f"{tile}: off the reference {err}")
    return False


def timed(fn, device: str) -> float:
    """Median ms; on CUDA of fn captured as a graph (as a decode step replays it)."""
    if device == "cuda":
        return bench_graph(fn)
    return time_ms(fn, iters=1, warmup=0)


def run_batch(
    s: Shape,
    b: int,
    kind: str,
    names,
    tiles,
    gen,
    pools,
    sample: int,
    ceil,
    mma_tiles=None,
    partial=None,
) -> dict:
    """One (routing, B) row; `partial(row)` (optional) after the check and after each
    variant's timing with the row so far (`partial`: True), so a run cut short keeps them."""
    k, v, offs, q8 = pools
    q = torch.randn(b, s.hq, s.d, device=s.device).to(s.dtype)  # [B, Hq, D]
    chunks_of = routing(b, s, kind, gen)
    refs: dict[str, tuple] = {}
    errs = check(s, q, chunks_of, k, v, offs, q8, names, min(sample, b), refs)
    sel = from_topk(chunks_of.view(b, 1, -1), s.hkv, s.chunks)
    scale = s.d**-0.5
    times: dict[str, Any] = {}  # name -> best; name_ms_by_tile, name_errors
    for name in names:
        kk, vv, kw = variant_args(name, k, v, q8)
        best = None
        todo = tiles
        if name in MMA and (mma_tiles is not None or len(tiles) > 1):
            todo = MMA_TILES if mma_tiles is None else mma_tiles
            todo = todo[name] if isinstance(todo, dict) else todo  # per variant (fp8_reach)
            if mma_tiles is QUICK_MMA_TILES:
                todo = [todo[0]] if name in AB_ONLY else [todo[0], *QUICK_WIDE]
        for tile in todo:
            tkw = {**tile, **({"use_tma": True} if "v_pool_t" in kw else {})}
            if tile and not tile_ok(name, tile, times, refs[name], (kk, vv, offs, kw, tkw)):
                continue

            def step(kk=kk, vv=vv, kw=kw, tkw=tkw):
                return gsa(q, kk, vv, offs, sel, scale, **kw, **tkw)

            try:
                ms = timed(step, s.device)
            except Exception as e:  # noqa: BLE001 - a tile that fails to compile: reported
                msg = f"{tile or 'default'}: {type(e).__name__}: {e}"[:300]
                times.setdefault(f"{name}_errors", []).append(msg)
                continue
            times.setdefault(f"{name}_ms_by_tile", {})[str(tile or "default")] = ms
            if best is None or ms < best[0]:
                best = (ms, tile or "default")
        if best is not None:
            times[name] = {"ms": best[0], "tile": str(best[1]), "tokens_per_s": b * 1e3 / best[0]}
            log(f"B={b} {kind}: {name} {best[0]:.3f} ms ({best[1]})")
        if partial is not None:
            partial({"batch": b, "routing": kind, "correctness": errs, **times, "partial": True})
    kv_bytes = {n: (1 if n != "bf16" else k.element_size()) for n in names}
    touched = int(torch.unique(chunks_of).numel())
    row = {"batch": b, "routing": kind, "chunks_touched": touched, "correctness": errs, **times}
    n_sel = b * s.hkv * s.top_k
    flops = attention_flops(n_sel * (s.hq // s.hkv), s.chunk, s.d)
    q_out = (b * s.hq + n_sel * (s.hq // s.hkv)) * s.d * 2  # q read, o written (bf16)
    for n in names:
        if n in times:  # every touched chunk's K and V read once per KV head group
            nbytes = touched * s.chunk * s.hkv * s.d * 2 * kv_bytes[n] + q_out
            if (
                n != "bf16" and "_chunk" not in n and "_block" not in n
            ):  # fp32 K, V scales per (token, head)
                nbytes += touched * s.chunk * s.hkv * 8
            times[n]["read_GB_per_s"] = nbytes / 1e9 / (times[n]["ms"] / 1e3)
            # the floor: these bytes at the measured read bandwidth, or the two products at
            # the measured bf16 GEMM rate (FP8 products at twice it), whichever binds
            f = floor_ms(
                nbytes,
                flops * MMA_COST.get(n, 1.0),
                ceil["read_bytes_per_s"],
                ceil["gemm_flops_per_s"],
            )
            times[n].update(f, of_floor=f["floor_ms"] / times[n]["ms"])
    if "bf16" in times:
        for n in names:
            if n != "bf16" and n in times:
                row[f"{n}_speedup_vs_bf16"] = times["bf16"]["ms"] / times[n]["ms"]
    log(f"B={b} {kind}: " + ", ".join(f"{n} {times[n]['ms']:.3f} ms" for n in names if n in times))
    return row


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    ap.add_argument(
        "--chunks", type=int, default=256, help="library chunks of 4,096 tokens (256: 1M tokens)"
    )
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--routing", nargs="+", default=["uniform", "zipf"])
    ap.add_argument("--sample", type=int, default=4, help="requests checked vs the reference")
    ap.add_argument("--no-fp8-dot", action="store_true", help="skip the FP8 tensor-core variant")
    ap.add_argument(
        "--variants", nargs="+", default=None, help="run only these (bf16 is always run)"
    )
    ap.add_argument(
        "--quick-tiles",
        action="store_true",
        help="launcher defaults for bf16/upcast, 3 tiles for the FP8 tensor-core variants",
    )
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes in the interpreter")
    ap.add_argument("--out", default="bench/results/fp8_attention.json")
    args = ap.parse_args(argv)
    tiles: list[dict[str, Any]]
    if args.cpu_dry_run:
        s, batches, tiles = DRY, [4, 8], [{}]
        args.out = args.out.replace(".json", "_cpu_dry_run.json")
        TOL.update({n: 0.15 for n in MMA})
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --cpu-dry-run)")
        s, batches, tiles = gpu_shape(args.chunks, args.top_k), args.batch, TILES
        if args.quick_tiles:
            tiles = [{}]
    mma_tiles = QUICK_MMA_TILES if args.quick_tiles else None
    if args.quick_tiles:
        CHECK_TILE.update(QUICK_MMA_TILES[0])
    names = ["bf16", "fp8", "fp8_chunk"] + ([] if args.no_fp8_dot else ["fp8_dot"]) + [*MMA]
    if args.variants:  # in the order given (the JSON is rewritten after each)
        names = ["bf16"] + [n for n in dict.fromkeys(args.variants) if n in names[1:]]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)  # routing, on the host
    pools = make_pools(s)
    ceil = measure_ceilings(s.device, gib=4.0 if s.device == "cuda" else 0.01)
    rows: list[dict] = []
    ok = True
    for kind in args.routing:
        for b in batches:  # the JSON rewritten after each row: a run cut short keeps its rows

            def partial(row, rows=rows):  # the rows so far and this one's part
                report(args.out, argv, s, ceil, [*rows, row], names, False, MMA, quiet=True)

            rows.append(
                run_batch(
                    s, b, kind, names, tiles, gen, pools, args.sample, ceil, mma_tiles, partial
                )
            )
            done = len(rows) == len(batches) * len(args.routing)
            ok = report(args.out, argv, s, ceil, rows, names, done, MMA)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
