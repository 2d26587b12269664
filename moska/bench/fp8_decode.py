"""End-to-end routed decode with an FP8 (e4m3) library against the same size of library in
bf16: issue 16's "end-to-end decode >= 1.3x at B = 256".

One decode step of a random-weight Llama of 8B dims (model forward + logits + argmax, as
`moska.bench.decode` times its `moska` mode): every request's own KV in the paged cache, the
library's chunks routed (top-k) and read by the grouped kernel. The library is random KV
(values do not change the cost; random keys route near-uniformly), made one layer at a time
on the device; its routing index is built from the bf16 keys as the builder does. Modes,
timed as CUDA graphs in one run (the library of one mode is freed before the next is made:
a bf16 and an FP8 copy of 512K tokens at 8B dims do not fit beside the model and the cache):

  bf16        the library in bf16
  fp8_upcast  e4m3 with per-token scales (as libraries store them), the upcast program
  fp8_mma     the same read on FP8 tensor cores (`--fp8-attention mma`: a token-major V copy,
              library/fp8_mma.py), and `fp8_mma_qsplit` (q in two e4m3 terms);
              `fp8_mma_qsplit_vb`: V's scales per 128-row block, K's per token (one V scale
              per key block read, no per-weight V multiply; quality as per-token,
              bench/results/fp8_quality_mixed.json); `_half`: q split in the later half of
              the layers only (bench/results/fp8_quality_layers.json)

    python -m moska.bench.fp8_decode [--batch 256] [--library-tokens 524288]
    python -m moska.bench.fp8_decode --cpu-dry-run --out /tmp/fp8_decode.json

A timing benchmark: the kernels' FP8 numerics are checked by tests/kernels and
bench/device_session16_fp8.sh (the modes here read different random values).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.attention.backend import PagedAttention
from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model, time_ms, write_json
from moska.bench.decode import BenchLibrary
from moska.kernel_ops import kernel_ops
from moska.kernels.router import build_routing_index
from moska.library.fp8 import BLOCK_ROWS, hadamard, quantize
from moska.library.fp8_mma import attach_token_major_v

MODES: tuple[str, ...] = ("bf16", "fp8_upcast", "fp8_mma", "fp8_mma_qsplit", "fp8_mma_qsplit_vb")
MODES += ("fp8_mma_qsplit_half", "fp8_mma_qsplit_vb_half")
# one-term q with V block scales: what a library with Hadamard-rotated K runs (session 18,
# bench/fp8_quality.py rot_* variants), less the rotation of q (one small GEMM a layer)
MODES += ("fp8_mma_vb",)
# K stored Hadamard-rotated with K and V scales per 128-row block, one-term q rotated at
# launch (top-1 0.9925 / 0.9914 on the quality model: bench/results/fp8_quality_rot_chunk.json)
MODES += ("fp8_mma_rot_blk",)


@dataclass(eq=False)
class RandomLibrary(BenchLibrary):
    """What the engine's library path reads of a LoadedLibrary, with its FP8 parts."""

    kv_scale_pools: list | None = None
    fp8_mma: Any = None
    tiers: Any = None
    extra: dict = field(default_factory=dict)

    def kv_scales(self, layer: int):
        return None if self.kv_scale_pools is None else self.kv_scale_pools[layer]


def make_library(
    mode: str, layers: int, tokens: int, chunk: int, hkv: int, d: int, dev: str, routing: list
):
    """A random library for `mode`, one layer at a time (only one bf16 layer extra at once).
    `routing`: the routing index of every layer, built here from the first library's keys
    when empty and reused by the later ones (what routing picks does not change the cost of
    random chunks; building it is most of a 512K-token library's making)."""
    offs = torch.arange(0, tokens + 1, chunk, dtype=torch.int32, device=dev)
    first = not routing
    lib = RandomLibrary([], [], routing, offs, tokens // chunk, tokens)
    fp8, vb, blk = mode != "bf16", "_vb" in mode, mode.endswith("_rot_blk")
    rot = hadamard(d).to(dev) if blk else None
    scales: list = []
    if fp8:
        lib.kv_scale_pools = scales
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for _ in range(layers):
        k = torch.randn(tokens, hkv, d, device=dev, dtype=dtype)
        v = torch.randn(tokens, hkv, d, device=dev, dtype=dtype)
        if first:
            routing.append(build_routing_index(k, offs))
        if rot is not None:  # K rotated (k R), K and V per 128-row block
            kq, vq = quantize(k @ rot.to(k.dtype), offs, "block"), quantize(v, offs, "block")
            k, v = kq.data, vq.data
            scales.append((kq.scale, vq.scale))
        elif fp8:  # per-token scales (_vb: V's per 128-row block)
            kq, vq = quantize(k, offs), quantize(v, offs, "block" if vb else "token")
            k, v = kq.data, vq.data
            scales.append((kq.scale, vq.scale))
        lib.k_pools.append(k)
        lib.v_pools.append(v)
    if mode.startswith("fp8_mma"):
        kind = mode[4:].removesuffix("_half").removesuffix("_vb").removesuffix("_rot_blk")
        why = attach_token_major_v(lib, kind)
        if why is not None:
            raise RuntimeError(f"{mode}: {why}")
        if vb:
            lib.fp8_mma = dataclasses.replace(lib.fp8_mma, v_block_rows=BLOCK_ROWS)
        if rot is not None:  # both sides per block, q rotated at launch
            lib.fp8_mma = dataclasses.replace(
                lib.fp8_mma, v_block_rows=BLOCK_ROWS, block_sides=3, q_rotation=rot.to(dtype)
            )
        if mode.endswith("_half"):  # q split in the later half of the layers only
            lib.fp8_mma = dataclasses.replace(lib.fp8_mma, q_split_from=layers // 2)
    return lib


def metadata(b: int, unique: int, bs: int, dev: str) -> AttentionMetadata:
    per_req = math.ceil((unique + 1) / bs)
    tables = torch.arange(b * per_req, device=dev).view(b, per_req)
    slot = tables[:, unique // bs].long() * bs + unique % bs
    return AttentionMetadata(
        slot_mapping=slot,
        cu_q_lens=torch.arange(b + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.full((b,), unique + 1, dtype=torch.int32, device=dev),
        block_tables=tables.to(torch.int32).contiguous(),
        decode_only=True,
    )


def run(args, save) -> dict:
    """Every mode's rows; `save(result)` after each mode (a run cut short keeps its rows)."""
    dev = "cpu" if args.cpu_dry_run else "cuda"
    if args.cpu_dry_run:
        from moska.model.default import CONFIG

        cfg, dtype = dict(CONFIG, num_hidden_layers=2), torch.float32
    else:
        cfg, dtype = dict(LLAMA_3_1_8B), torch.bfloat16
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    loaded = random_loaded_model(cfg, dtype, dev)
    model, mc = loaded.model, loaded.config
    model.kernels = kernel_ops("auto", dev)
    bs = 16
    per_req = math.ceil((args.unique_tokens + 1) / bs)
    cache = PagedKVCache(
        mc.num_layers, max(args.batch) * per_req, bs, mc.num_kv_heads, mc.head_dim, dtype, dev
    )
    for t in (cache.k, cache.v):
        t.normal_()
    attention = PagedAttention(cache, kernel_ops("triton"), mc.sm_scale)
    rows: list[dict] = []
    routing: list = []  # every mode's routing index (made with the first library)
    for mode in args.modes:
        if mode != "bf16" and dev == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            rows.append({"mode": mode, "skipped": "e4m3 needs compute capability 8.9+"})
            continue
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            lib = make_library(
                mode, mc.num_layers, args.library_tokens, args.chunk_size,
                mc.num_kv_heads, mc.head_dim, dev, routing,
            )  # fmt: skip
        except RuntimeError as e:  # e.g. no TMA on this GPU: said in the JSON
            rows.append({"mode": mode, "skipped": str(e)})
            continue
        for scorer in args.scorers:
            for b in args.batch:
                rows.append(time_step(model, attention, lib, mode, b, args, dev, scorer))
                print(f"{mode:15s} {scorer:9s} B={b:4d} {rows[-1]['step_ms']:8.2f} ms", flush=True)
        del lib
        if dev == "cuda":
            torch.cuda.empty_cache()
        save({"rows": rows, "summary": summarize(rows, args.batch)})
    return {"rows": rows, "summary": summarize(rows, args.batch)}


def time_step(
    model, attention, lib, mode: str, b: int, args, dev: str, scorer: str = "keymax"
) -> dict:
    meta = metadata(b, args.unique_tokens, 16, dev)
    rows = torch.arange(b, device=dev)
    meta.groups.append(
        LibraryGroup(library=lib, rows=rows, top_k=args.top_k, scorer=scorer, all_rows=True)
    )
    bound = attention.bind(meta)
    ids = torch.randint(0, model.config.vocab_size, (b,), device=dev)
    pos = torch.full((b,), args.library_tokens + args.unique_tokens, device=dev)

    def step():
        return model.compute_logits(model(ids, pos, bound)).argmax(-1)

    fn, graphed, why = step, False, ""
    if dev == "cuda":
        from moska.bench.common import capture_graph

        try:
            fn, graphed = capture_graph(step), True
        except Exception as e:  # noqa: BLE001 - timed eagerly instead, said in the row
            torch.cuda.synchronize()
            why = f"CUDA graph capture failed, eager: {type(e).__name__}: {e}"[:300]
    ms = time_ms(fn, iters=args.iters, warmup=1)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    kernels = kernel_split(step) if args.profile and dev == "cuda" else {}
    return {
        **({"kernel_ms": kernels} if kernels else {}),
        "mode": mode,
        "scorer": scorer,
        "batch": b,
        "step_ms": ms,
        "decode_tokens_per_s": b / (ms / 1e3),
        "cuda_graph": graphed,
        **({"graph_error": why} if why else {}),
        "library_kv_gib": sum(t.numel() * t.element_size() for t in lib.k_pools + lib.v_pools)
        / 2**30,
        "peak_gpu_gib": mem,
    }


def kernel_split(step) -> dict:
    """GPU ms of one eager step by kernel family (the grouped shared-attention programs,
    the router, paged attention, GEMMs, the rest): what share FP8 can change."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    fams = {"grouped": ("grouped", "fp8_mma"), "router": ("keymax", "project", "summary_scores")}
    fams.update(paged=("paged",), gemm=("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet"))
    out: dict[str, float] = {}
    for e in prof.key_averages():
        name = e.key.lower()
        fam = next((f for f, keys in fams.items() if any(k in name for k in keys)), "other")
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        out[fam] = out.get(fam, 0.0) + float(t or 0.0) / 1e3  # us -> ms
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def summarize(rows: list[dict], batches: list[int]) -> dict:
    out: dict[str, Any] = {"target": "end-to-end FP8 decode >= 1.3x bf16 tok/s at B = 256"}
    for sc in dict.fromkeys(r.get("scorer", "keymax") for r in rows if "step_ms" in r):
        tag = "" if sc == "keymax" else f"_{sc}"  # the default router's keys as before
        for b in batches:
            ms = {
                r["mode"]: r["step_ms"]
                for r in rows
                if r.get("batch") == b and r.get("scorer", "keymax") == sc and "step_ms" in r
            }
            if "bf16" in ms:
                for m, t in ms.items():
                    if m != "bf16":
                        out[f"B{b}{tag}_{m}_vs_bf16"] = round(ms["bf16"] / t, 3)
            out[f"B{b}{tag}_step_ms"] = {m: round(v, 3) for m, v in ms.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256])
    ap.add_argument("--library-tokens", type=int, default=512 * 1024)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--unique-tokens", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument(
        "--scorers", nargs="+", default=["keymax"], choices=("keymax", "two_stage"),
        help="routers timed per mode (the library path's scorer; keymax is the default)",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="GPU ms by kernel family per mode")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model and library on CPU")
    ap.add_argument("--out", default="bench/results/fp8_decode.json")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.library_tokens, args.chunk_size, args.unique_tokens = 512, 64, 32
        args.batch, args.top_k, args.iters = [4], 2, 1
        args.modes = [m for m in args.modes if m in ("bf16", "fp8_upcast")]  # mma: CUDA only
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-dry-run)")
    torch.manual_seed(0)
    shape = {k: getattr(args, k) for k in ("library_tokens", "chunk_size", "unique_tokens")}
    shape.update(top_k=args.top_k, model="Llama-3.1-8B dims, random bf16", dry=args.cpu_dry_run)

    def save(res: dict) -> None:
        path = write_json(args.out, {"shape": shape, **environment(argv), **res})
        print(f"wrote {path}: {res['summary']}", flush=True)

    run(args, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
