"""What composing libraries costs in attention time: one layer's shared attention of a batch of
decode rows over P position-independent libraries (routing over the union, the grouped
attention, one LSE merge) against the same chunks as ONE library, at the same total chunks
and top-k. Two layouts of the P libraries' KV:

- ``arena``: the P pools are ranges of one arena tensor (library/arena.py, what the library
  manager does): one grouped launch over chunks of every library;
- ``separate``: each library's pools are an allocation of their own (what composition did
  before the arena): a launch per library over the same selections, states summed.

Per setting: ``step_ms`` (routing + attention + merge) and ``attend_ms`` (the grouped
attention alone, fixed selections). Synthetic pools (random keys and values, a real routing
index per part); bf16 on the GPU. The dry run also checks that both layouts give one output.

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

from moska.attention.composed import composed_group_states, global_states, select_global
from moska.attention.metadata import LibraryGroup
from moska.attention.shared import shared_attention_for_group
from moska.bench.common import cuda_time_ms, environment
from moska.kernel_ops import kernel_ops
from moska.kernels.router import build_routing_index
from moska.library.arena import ArenaLayout, KVArena
from moska.library.composition import ComposedLibrary


def part(k: torch.Tensor, v: torch.Tensor, chunk: int, name: str, rng=None):
    """A one-layer independent library over pools k/v [S, Hkv, D] (what the attention reads);
    ``rng``: the arena range k/v are views of."""
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
        arena_range=rng,
    )


def parts_of(k, v, p: int, chunk: int, layout: str) -> list:
    """P libraries over equal slices of k/v: in one arena, or each in pools of its own."""
    per = k.shape[0] // p
    if layout == "separate":
        return [
            part(k[i * per : (i + 1) * per].clone(), v[i * per : (i + 1) * per].clone(), chunk,
                 f"p{i}")
            for i in range(p)
        ]  # fmt: skip
    arena = KVArena(ArenaLayout(1, k.shape[1], k.shape[2], k.dtype, k.device), k.shape[0] + 64)
    arena.allocate(64)  # the parts do not start at row 0
    out = []
    for i in range(p):
        rng = arena.allocate(per)
        rng.k(0).copy_(k[i * per : (i + 1) * per])
        rng.v(0).copy_(v[i * per : (i + 1) * per])
        out.append(part(rng.k(0), rng.v(0), chunk, f"p{i}", rng))
    return out


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
        args.heads, args.head_dim, args.iters, args.parts = [4, 2], 32, 1, [1, 2, 4]
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
    outputs = {}
    for p in args.parts:
        if args.chunks % p:
            raise SystemExit(f"--chunks {args.chunks} must split into {p} equal parts")
        for layout in ("one",) if p == 1 else ("arena", "separate"):
            if p == 1:
                lib = part(k, v, args.chunk_size, "one")
            else:
                lib = ComposedLibrary(tuple(parts_of(k, v, p, args.chunk_size, layout)))
            group = LibraryGroup(lib, rows, top_k=args.top_k, all_rows=True)

            def step(group=group, single=p == 1):
                if single:
                    o, lse, sel = shared_attention_for_group(ops, 0, q, group, sm)
                else:
                    o, lse, sel = composed_group_states(ops, 0, q, group, sm)
                return ops.merge_selections(o_base, lse_base, o, lse, sel)

            if p == 1:
                sel = shared_attention_for_group(ops, 0, q, group, sm)[2]

                def attend(lib=lib, sel=sel):
                    pools = (lib.k_pools[0], lib.v_pools[0])
                    return ops.grouped_shared(q, *pools, lib.chunk_offsets, sel, sm)
            else:
                sel = select_global(q, group, 0, [sm] * p, [0.0] * p, ops.triton_routing)

                def attend(lib=lib, sel=sel):
                    return global_states(ops, 0, q, lib, sel, sm)

            outputs[(p, layout)] = step()[0].float()
            row = {"parts": p, "layout": layout}
            row["step_ms"] = round(timed(step, cuda, args.iters), 4)
            row["attend_ms"] = round(timed(attend, cuda, args.iters), 4)
            results.append(row)
            print(json.dumps(results[-1]), flush=True)
    for p in args.parts[1:] if args.parts[0] == 1 else args.parts:  # same picks, same output
        a, b = outputs[(p, "arena")], outputs[(p, "separate")]
        err = float((a - b).norm() / b.norm())
        if args.cpu_dry_run and err > 1e-5:
            raise SystemExit(
                f"{p} parts: the arena's output differs from separate pools' ({err:.2e})"
            )
    one = next((r for r in results if r["parts"] == 1), None)
    summary = {
        "step_ms": {f"{r['parts']}/{r['layout']}": r["step_ms"] for r in results},
        "attend_ms": {f"{r['parts']}/{r['layout']}": r["attend_ms"] for r in results},
        "attend_ratio_vs_one_library": {
            f"{r['parts']}/{r['layout']}": round(r["attend_ms"] / one["attend_ms"], 3)
            for r in results
        }
        if one
        else None,
        "step_ratio_vs_one_library": {
            f"{r['parts']}/{r['layout']}": round(r["step_ms"] / one["step_ms"], 3) for r in results
        }
        if one
        else None,
    }
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
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
