"""SemShareKV's row attention alone: the Triton kernel (`moska/kernels/row_attention.py`)
against the SDPA path it replaces on CUDA (`RowAttention(kernel=False)`: gather the
prompt's KV by slot, repeat the KV heads, a dense [R, S] mask, PyTorch's memory-efficient
kernel), on one layer of a 1B Llama's shape (32 query heads, 8 KV heads, head_dim 64) over
a paged cache (16-token blocks, shuffled table).

Cases: R rows at scattered sorted positions of an S-token prompt (the blend's later layers,
~19% of the prompt at 5K tokens on the near-duplicate workload), and every row (the same
count as a first layer, by positions; beside it the first layers' own path, causal flash
attention without a mask). Per case: device time (CUDA events,
median) and host wall time per call with launches queued back to back (a blend's layers
do not wait between calls), the kernel at several tile shapes, and its error against SDPA.

GPU: python3 bench/row_attention.py --out $OUT/row_attention_h200.json
CPU check: .venv/bin/python bench/row_attention.py --cpu-dry-run   (interpreter, tiny)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--cpu-dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moska.bench.common import cuda_time_ms, environment
from moska.kernels.row_attention import row_attention
from moska.semshare.row_attention import RowAttention

# (block_m, block_n, num_warps, num_stages); the first is the launcher's default on CUDA
TILES = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2)]


class _Cache:
    def __init__(self, k, v):
        self.k, self.v = k, v  # [1, blocks, bs, Hkv, D]


def _case(s, rows, hq, hkv, d, bs, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-s // bs) + 3
    k = torch.randn(1, blocks, bs, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(1, blocks, bs, hkv, d, generator=gen).to(device, dtype)
    table = torch.randperm(blocks, generator=gen)
    pos = torch.arange(s)
    slots = (table[pos // bs] * bs + pos % bs).to(device)  # [S] int64
    if rows >= s:
        positions = torch.arange(s)
    else:
        positions = torch.randperm(s, generator=gen)[:rows].sort().values
    q = torch.randn(positions.numel(), hq, d, generator=gen).to(device, dtype)
    return _Cache(k, v), slots, positions.to(device), q


def _wall_ms(fn, calls, sync):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) * 1e3 / calls


def _measure(cache, slots, positions, q, tiles, timed) -> dict:
    """SDPA path, kernel through RowAttention, kernel alone per tile; error vs SDPA."""
    hkv, d = cache.k.shape[-2:]
    sdpa = RowAttention(cache, slots, positions, d**-0.5, kernel=False)
    kern = RowAttention(cache, slots, positions, d**-0.5, kernel=True)
    want = sdpa(0, q, None, None).float()
    got = kern(0, q, None, None).float()
    kc, vc = cache.k[0].view(-1, hkv, d), cache.v[0].view(-1, hkv, d)
    pos32 = positions.to(torch.int32)
    per_tile = []
    for bm, bn, w, st in tiles:

        def launch(bm=bm, bn=bn, w=w, st=st):
            return row_attention(
                q, kc, vc, slots, pos32, d**-0.5, block_m=bm, block_n=bn, num_warps=w,
                num_stages=st,
            )  # fmt: skip

        tile = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
        per_tile.append({**tile, **timed(launch)})
    every_row = positions.numel() == slots.numel()
    if every_row:  # what a whole prompt's first layers run: flash, causal, no mask
        flash = RowAttention(cache, slots, positions, d**-0.5, causal=True, kernel=False)
    return {
        "sdpa_causal_flash": timed(lambda: flash(0, q, None, None)) if every_row else None,
        "rows": int(positions.numel()),
        "rel_err_vs_sdpa": float((got - want).norm() / want.norm()),
        "sdpa": timed(lambda: sdpa(0, q, None, None)),
        "kernel_in_row_attention": timed(lambda: kern(0, q, None, None)),
        "kernel_tiles": per_tile,
        "best_tile": min(per_tile, key=lambda t: t["device_ms"] or t["wall_ms"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=5120)
    ap.add_argument("--fraction", type=float, default=0.19, help="rows of the scattered case")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu-dry-run", action="store_true", help="interpreter, tiny shapes")
    ap.add_argument("--out", default=str(ROOT / "bench/results/row_attention.json"))
    args = ap.parse_args()
    dry = args.cpu_dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    hq, hkv, d, bs = (8, 2, 16, 16) if dry else (32, 8, 64, 16)
    s = 96 if dry else args.prompt
    iters = 2 if dry else args.iters
    tiles = [(16, 16, 4, 1)] if dry else TILES
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        wall = _wall_ms(fn, iters, sync)
        return {"device_ms": None if dry else cuda_time_ms(fn, iters), "wall_ms": wall}

    cases = []
    for name, rows in (("scattered", max(1, round(args.fraction * s))), ("every_row", s)):
        case = _case(s, rows, hq, hkv, d, bs, dtype, device, seed=0)
        res = {"case": name, **_measure(*case, tiles, timed)}
        cases.append(res)
        print(json.dumps({k: res[k] for k in ("case", "rows", "rel_err_vs_sdpa", "sdpa")}))
        print("  kernel:", res["kernel_in_row_attention"], "best tile:", res["best_tile"])

    key = "wall_ms" if dry else "device_ms"
    summary = {
        c["case"]: {
            "rows": c["rows"],
            "sdpa_" + key: c["sdpa"][key],
            "kernel_" + key: c["kernel_in_row_attention"][key],
            "speedup": c["sdpa"][key] / c["kernel_in_row_attention"][key],
            "sdpa_wall_ms": c["sdpa"]["wall_ms"],
            "kernel_wall_ms": c["kernel_in_row_attention"]["wall_ms"],
            "rel_err_vs_sdpa": c["rel_err_vs_sdpa"],
            "sdpa_causal_flash_" + key: (c["sdpa_causal_flash"] or {}).get(key),
        }
        for c in cases
    }
    out = {
        "env": environment(),
        "device": device,
        "dtype": str(dtype),
        "shape": {"prompt": s, "hq": hq, "hkv": hkv, "head_dim": d, "block_size": bs},
        "cpu_dry_run": dry,
        "cases": cases,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
