"""What composing libraries costs in attention time: one layer's shared attention of a batch of
decode rows over P position-independent libraries (routing over the union, one grouped launch
per library, one LSE merge) against the same chunks as ONE library (routing, one launch, one
merge), at the same total chunks and top-k. The gap is what one launch over one slot space
would save.

Synthetic pools (random keys and values, a real routing index per part); bf16 on the GPU.

Usage: python bench/composition_speed.py [--rows 256] [--chunks 256] [--parts 1 2 4]
       python bench/composition_speed.py --cpu-dry-run   (tiny, torch ops, checks the path)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moska.attention.composed import composed_group_states
from moska.attention.metadata import LibraryGroup
from moska.attention.shared import shared_attention_for_group
from moska.bench.common import cuda_time_ms, environment
from moska.kernel_ops import kernel_ops
from moska.kernels.router import build_routing_index
from moska.library.composition import ComposedLibrary


def part(k: torch.Tensor, v: torch.Tensor, chunk: int, name: str):
    """A one-layer independent library over pools k/v [S, Hkv, D] (what the attention reads)."""
    offsets = torch.arange(0, k.shape[0] + 1, chunk, dtype=torch.int32, device=k.device)
    return SimpleNamespace(
        name=name,
        build_id=name,
        mode="independent",
        position_offset=chunk + 1,
        manifest=SimpleNamespace(model=None, chunk_sink=True),
        num_chunks=offsets.numel() - 1,
        num_tokens=k.shape[0],
        chunk_size=chunk,
        k_pools=[k],
        v_pools=[v],
        chunk_offsets=offsets,
        routing=[build_routing_index(k, offsets)],
        tiers=None,
        kv_scale_pools=None,
    )


def timed(fn, cuda: bool, iters: int) -> float:
    if cuda:
        return cuda_time_ms(fn, iters=iters)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="decode rows (requests)")
    ap.add_argument("--chunks", type=int, default=256, help="chunks over all parts")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], help="Hq Hkv")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/composition_speed.json"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if args.cpu_dry_run:
        args.rows, args.chunks, args.chunk_size, args.top_k = 4, 8, 16, 2
        args.heads, args.head_dim, args.iters, args.parts = [4, 2], 32, 1, [1, 2]
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    ops = kernel_ops("triton" if cuda else "torch")
    (hq, hkv), d = args.heads, args.head_dim
    gen = torch.Generator(device=dev).manual_seed(0)
    S = args.chunks * args.chunk_size
    k = torch.randn(S, hkv, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(S, hkv, d, device=dev, dtype=dtype, generator=gen)
    q = torch.randn(args.rows, hq, d, device=dev, dtype=dtype, generator=gen)
    o_base = torch.randn(args.rows, hq, d, device=dev, dtype=dtype, generator=gen)
    lse_base = torch.randn(args.rows, hq, device=dev, generator=gen)
    sm = d**-0.5
    rows = torch.arange(args.rows, device=dev)
    results = []
    for p in args.parts:
        if args.chunks % p:
            raise SystemExit(f"--chunks {args.chunks} must split into {p} equal parts")
        per = S // p
        parts = [
            part(k[i * per : (i + 1) * per], v[i * per : (i + 1) * per], args.chunk_size, f"p{i}")
            for i in range(p)
        ]
        lib = parts[0] if p == 1 else ComposedLibrary(tuple(parts))
        group = LibraryGroup(lib, rows, top_k=args.top_k, all_rows=True)

        def step(group=group, single=p == 1):
            if single:
                o, lse, sel = shared_attention_for_group(ops, 0, q, group, sm)
            else:
                o, lse, sel = composed_group_states(ops, 0, q, group, sm)
            return ops.merge_selections(o_base, lse_base, o, lse, sel)

        ms = timed(step, cuda, args.iters)
        results.append({"parts": p, "ms": round(ms, 4)})
        print(json.dumps(results[-1]), flush=True)
    one = results[0]["ms"] if results and results[0]["parts"] == 1 else None
    summary = {
        "ms_by_parts": {r["parts"]: r["ms"] for r in results},
        "ratio_vs_one_library": {r["parts"]: round(r["ms"] / one, 3) for r in results}
        if one
        else None,
    }
    out = {
        "env": environment(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "shapes": {"q": [args.rows, hq, d], "pool": [S, hkv, d], "chunks": args.chunks},
        "dtype": str(dtype),
        "device": str(dev),
        "results": results,
        "summary": summary,
    }
    path = Path(args.out)
    if args.cpu_dry_run:
        path = path.with_name(path.stem + "_cpu_dry_run.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
