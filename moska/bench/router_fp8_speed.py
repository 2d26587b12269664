"""The default router's key-max scores on FP8 tensor cores against the fp16 kernel (#16).

At 8B dims (Hq 32, Hkv 8, D 128, routing rank 32), B requests, a library of C chunks of
4,096 tokens: the engine's fp16 key-max (`router_dense.keymax_dense_scores`, its query
projection included) against `router_fp8` (queries projected and cut to e4m3 per row, keys
e4m3 per (chunk, KV head)), several FP8 tiles. Both checked first against the fp32 scores
of the same keys (relative error, and the share of each (request, KV head)'s top-k chunks
they keep). Times are CUDA-graph replays (median); the FLOP floor from the bf16 matmul and
e4m3 `_scaled_mm` rates measured in the run.

    python -m moska.bench.router_fp8_speed --out $OUT/router_fp8_speed.json
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from moska.bench.common import environment, write_json
from moska.bench.floors import measure_matmul
from moska.bench.kernels_shapes import timer as make_timer
from moska.kernels.router_dense import keymax_dense_scores
from moska.kernels.router_fp8 import keymax_fp8_scores, project_queries_fp8, quantize_lowrank_keys
from moska.kernels.router_ref import keymax_scores_ref

# (block_b, block_n, num_warps, num_stages, f16_acc)
FP8_TILES = [
    (32, 128, 4, 4, True),
    (32, 128, 4, 4, False),
    (64, 128, 4, 4, True),
    (64, 128, 8, 4, True),
    (32, 256, 4, 3, True),
    (64, 256, 8, 3, True),
    (128, 128, 8, 3, True),
    (32, 64, 4, 5, True),
]


def fp8_matmul_flops(dev: str) -> float:
    """The best e4m3 `torch._scaled_mm` rate over two square sizes (FLOP/s)."""
    from triton.testing import do_bench

    best = 0.0
    for n in (8192, 16384):
        a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=dev)
        ms = do_bench(
            lambda a=a, b=b, one=one: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)
        )
        best = max(best, 2 * n**3 / (ms * 1e-3))
    return best


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Share of b's top-k chunks per (request, KV head) that a's top-k also holds."""
    k = min(k, a.shape[-1])
    ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
    return float((ta[..., :, None] == tb[..., None, :]).any(-1).float().mean())


def _fp8_scores(q, basis, keys8, ks, offs, tile: dict) -> torch.Tensor:
    return keymax_fp8_scores(*project_queries_fp8(q, basis), keys8, ks, offs, **tile)


def case(b: int, chunks: int, measure, log, dev: str = "cuda") -> dict:
    hq, hkv, d, r, L = 32, 8, 128, 32, 4096
    s = chunks * L
    offs = torch.arange(0, s + 1, L, dtype=torch.int32, device=dev)
    basis = torch.linalg.qr(torch.randn(hkv, d, r, device=dev))[0].to(torch.bfloat16)
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    # low-rank keys with a per-chunk offset so that chunks differ (routing has a signal)
    lk32 = torch.randn(s, hkv, r, device=dev) + torch.randn(
        chunks, hkv, r, device=dev
    ).repeat_interleave(L, 0)
    lk16 = lk32.half()
    keys8, ks = quantize_lowrank_keys(lk16, offs)
    sub = slice(0, min(b, 16))
    exact = keymax_scores_ref(q[sub].float(), basis.float(), lk16.float(), offs)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "fp16": lambda: keymax_dense_scores(q, basis, lk16, offs)
    }
    for t in FP8_TILES:
        bb, bn, nw, ns, f16 = t
        name = f"fp8_b{bb}n{bn}w{nw}s{ns}{'_f16acc' if f16 else ''}"
        fns[name] = functools.partial(
            _fp8_scores, q, basis, keys8, ks, offs, {"block_b": bb, "block_n": bn, "num_warps": nw,
                                                        "num_stages": ns, "f16_acc": f16},
        )  # fmt: skip
    out: dict = {"B": b, "chunks": chunks, "rank": r, "checks": {}, "ms": {}, "errors": {}}
    base = None
    for name, fn in fns.items():
        try:
            got = fn()
            rel = float((got[sub] - exact).norm() / exact.norm())
            base = got if base is None else base
            out["checks"][name] = {"rel_vs_fp32": rel, "top8_kept_vs_fp32": overlap(got[sub], exact, 8),
                                   "top8_kept_vs_fp16": overlap(got, base, 8)}  # fmt: skip
            out["ms"][name] = measure(fn)
        except Exception as e:  # noqa: BLE001 - record it, go on
            out["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    flops = 2 * b * hq * s * r
    out["flops"] = flops
    best8 = min((t for n, t in out["ms"].items() if n != "fp16"), default=float("nan"))
    out["fp16_over_best_fp8"] = out["ms"].get("fp16", float("nan")) / best8
    log(f"B {b} C {chunks}: " + " ".join(f"{n} {t:.3f}" for n, t in out["ms"].items()))
    log("   checks", {n: round(c["rel_vs_fp32"], 4) for n, c in out["checks"].items()},
        "errors", list(out["errors"]))  # fmt: skip
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="256:128,1024:256", help="B:chunks pairs")
    args = ap.parse_args(argv)
    t0 = time.time()

    def log(*a):
        print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)

    torch.manual_seed(0)
    mm = measure_matmul("cuda", sizes=(8192, 16384), reps=5)
    fp8 = fp8_matmul_flops("cuda")
    log(f"bf16 matmul {mm['matmul_flops_per_s'] / 1e12:.0f}, e4m3 {fp8 / 1e12:.0f} TFLOP/s")
    payload = {**environment(), "matmul": mm, "e4m3_flops_per_s": fp8, "cases": []}
    measure = make_timer("cuda")
    for c in args.cases.split(","):
        b, chunks = (int(x) for x in c.split(":"))
        res = case(b, chunks, measure, log)
        res["fp16_floor_ms"] = res["flops"] / mm["matmul_flops_per_s"] * 1e3
        res["fp8_floor_ms"] = res["flops"] / fp8 * 1e3
        payload["cases"].append(res)
        write_json(args.out, payload)
    payload["summary"] = {
        f"B{r['B']}": {"fp16_ms": r["ms"].get("fp16"), "best_fp8": min(
            (n for n in r["ms"] if n != "fp16"), key=r["ms"].get, default=None),
            "speedup": r["fp16_over_best_fp8"], "fp16_floor_ms": r["fp16_floor_ms"],
            "fp8_floor_ms": r["fp8_floor_ms"]}
        for r in payload["cases"]
    }  # fmt: skip
    write_json(args.out, payload)
    log(payload["summary"])


if __name__ == "__main__":
    main()
