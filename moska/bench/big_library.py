"""A library larger than the model's context (and, tiered, than the GPU budget) served by the
real engine: decode output tokens/s, TTFT, tier hit rates, GPU / CPU / disk memory.

A random-weight model at Llama-3.2-1B (`--dims 1b`: 16 layers, 8 KV heads, d = 64) or
Llama-3.1-8B dims (`--dims 8b`), and a position-independent library whose chunk KV is drawn
at random on the device (normal values; the routing index is built from these keys as the
builder does). It is not prefilled: a real build of 2M tokens would take far longer than a
benchmark run (the JSON says so). Its chunks' keys are scaled by 1 + skew / (rank + 1) (rank: a
random permutation of the chunks, the same in every layer), so that routing favours some
chunks as real routing does (Zipf-like; skew 0: every chunk alike). Placements, timed on the
same library in one run (B requests, all at once, U own tokens, G generated each):

  resident  the whole library in device memory, served through the engine's library path
            (CUDA graphs at each batch bucket)
  pinned    its KV in pinned CPU memory behind a GPU chunk cache of `--gpu-budget-fraction`
            of its KV (library/tiers.py over MemoryChunks), per miss policy
  disk      written in the store's on-disk format (save_library), the page cache of its
            files dropped (posix_fadvise), loaded by the engine's own LibraryManager with
            `library_gpu_budget` and `library_cpu_budget` (`--cpu-budget-fraction` of its
            KV in pinned CPU memory, the rest read from disk by offset), per miss policy

    python -m moska.bench.big_library --dims 1b --library-tokens 2097152   # 64 GiB, H200
    python -m moska.bench.big_library --dims 8b --library-gib 16            # resident, disk
    python -m moska.bench.big_library --cpu-dry-run --out /tmp/big_dry.json # tiny, CPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moska.bench.big_library_env import (
    describe,
    dims_config,
    disk_bytes,
    drop_page_cache,
    filesystem_of,
    host_memory,
    summarize,
)
from moska.bench.common import environment, random_loaded_model, write_json
from moska.bench.serve import Setup, measure
from moska.bench.serve_workload import InMemoryLibraries, synthetic_manifest
from moska.config import EngineConfig
from moska.engine.llm_engine import LLMEngine
from moska.library.loaded import LoadedLibrary

LIBRARY = "big-library"
PLACEMENTS = ("resident", "pinned", "disk")
DEFAULT_PLACEMENTS = {"1b": "resident", "8b": "resident,disk"}
NOTES = (
    "2M tokens at 1B dims are 64 GiB of bf16 KV (+ 8 GiB of routing index): they fit an "
    "H200 whole, so the default placement is resident; pinned (64 GiB of the machine's "
    "128 GiB pinned) is optional, disk (64 GiB of its 64 GiB disk) does not fit. At 8B dims "
    "the library is written to disk and served with a GPU budget of a quarter of its KV, "
    "half of it in pinned CPU memory. Tiered steps run eagerly; resident ones replay CUDA "
    "graphs. Per-KV-head top-k over B requests reads most chunks at every step."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", choices=("1b", "8b"), default="1b")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--library-tokens", type=int, default=None)
    size.add_argument("--library-gib", type=float, default=None, help="KV size instead")
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--skew", type=float, default=0.5, help="chunk key scale 1 + skew/(rank+1)")
    ap.add_argument("--requests", type=int, default=64, help="B, also max_num_seqs")
    ap.add_argument("--unique-tokens", type=int, default=128, help="U, each request's own")
    ap.add_argument("--max-tokens", type=int, default=32, help="G, generated per request")
    ap.add_argument("--arrivals", nargs="+", default=["burst"], choices=("burst", "poisson"))
    ap.add_argument("--rate", type=float, default=64.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--placements", default=None, help=f"of {PLACEMENTS}; default by --dims")
    ap.add_argument("--miss-policies", default="wait,skip", help="for pinned and disk")
    ap.add_argument("--gpu-budget-fraction", type=float, default=0.25, help="of the library KV")
    ap.add_argument("--cpu-budget-fraction", type=float, default=0.5, help="disk placement")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.95)
    ap.add_argument("--scratch-dir", default=None, help="where the disk placement writes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default bench/results/big_library_<dims>.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model on CPU, seconds")
    a = ap.parse_args(argv)
    if a.cpu_dry_run:
        a.requests, a.unique_tokens, a.max_tokens, a.chunk_size, a.top_k = 3, 8, 3, 32, 2
        a.library_tokens, a.library_gib, a.max_num_batched_tokens = 256, None, 256
        a.placements = a.placements or ",".join(PLACEMENTS)
    a.placements = [p for p in PLACEMENTS if p in (a.placements or DEFAULT_PLACEMENTS[a.dims])]
    a.miss_policies = [p for p in a.miss_policies.split(",") if p]
    if a.out is None:
        a.out = f"bench/results/big_library_{'dry' if a.cpu_dry_run else a.dims}.json"
    return a


def make_library(loaded, num_tokens: int, chunk_size: int, skew: float, seed: int) -> Any:
    """A position-independent library of `num_tokens` random tokens whose KV pools are random
    normal values made on the model's device (keys scaled per chunk by the skew), with the
    routing index built from those keys."""

    from moska.kernels.router import build_routing_index
    from moska.library.chunking import corpus_from_token_ids

    config, param = loaded.config, next(loaded.model.parameters())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size, (num_tokens,), generator=gen, dtype=torch.int32)
    corpus = corpus_from_token_ids([("random", ids.tolist())], "independent", chunk_size)
    offs = corpus.chunk_offsets
    rank = torch.randperm(len(offs) - 1, generator=gen)
    scale = (1.0 + skew / (rank.double() + 1.0)).float()  # [C]
    rows = torch.tensor([b - a for a, b in itertools.pairwise(offs)])
    row_scale = scale.repeat_interleave(rows).to(param.device)[:, None, None]  # [S, 1, 1]
    dgen = torch.Generator(device=param.device).manual_seed(seed + 1)
    shape = (num_tokens, config.num_kv_heads, config.head_dim)  # [S, Hkv, D]
    offsets = torch.tensor(offs, dtype=torch.int32, device=param.device)
    k_pools, v_pools, routing = [], [], []
    for _ in range(config.num_kv_layers):  # normal tensors (as serve's random_library)
        k = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(generator=dgen)
        k.mul_(row_scale.to(k.dtype))
        v = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(generator=dgen)
        with torch.inference_mode():
            routing.append(build_routing_index(k, offsets))  # from the exact keys
        k_pools.append(k)
        v_pools.append(v)
    del row_scale
    manifest = synthetic_manifest(LIBRARY, loaded, corpus, routing)
    return LoadedLibrary(manifest, offsets, k_pools, v_pools, routing, ids)


def engine_config(a, loaded, device: str, **extra) -> EngineConfig:
    """Sized for B requests twice over (the warm-up's and the run's), positions after one
    chunk (an independent library's requests start at `chunk_size`)."""
    own = a.unique_tokens + a.max_tokens
    per_req = math.ceil((own + 1) / 16)
    return EngineConfig(
        model=None if device == "cpu" else f"random-llama-{a.dims}",
        device=device,
        num_kv_blocks=2 * a.requests * per_req + 64,
        max_model_len=min(a.chunk_size + own + 16, loaded.config.max_position_embeddings),
        gpu_memory_utilization=a.gpu_memory_utilization if device == "cuda" else 0.85,
        max_num_seqs=a.requests,
        max_num_batched_tokens=a.max_num_batched_tokens,
        default_top_k_chunks=a.top_k,
        **extra,
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_figures() -> dict:
    if not torch.cuda.is_available():
        return {"gpu_allocated_gib": None, "gpu_peak_gib": None}
    return {
        "gpu_allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def serve(a, setup: Setup, engine: LLMEngine, name: str) -> dict:
    """Warm-up, graphs, the timed runs (serve.measure), then memory figures."""
    lib = engine.libraries.get(LIBRARY)
    tiers = getattr(lib, "tiers", None)
    row: dict[str, Any] = {"library_device_gib": lib.nbytes / 2**30}
    if tiers is not None:
        row["gpu_slots_per_layer"] = tiers.num_slots
        row["cpu_tier_pinned_gib"] = tiers.cpu.nbytes / 2**30
        row["tier_config"] = {
            k: getattr(tiers.config, k) for k in ("eviction", "miss_policy", "prefetch")
        }
    row.update(measure(engine, setup, a, name, library=LIBRARY))
    row.update(gpu_figures(), **host_memory())
    return row


def run_resident(a, setup: Setup, library) -> dict:
    root = tempfile.mkdtemp(prefix="moska-big-")
    try:
        libraries = InMemoryLibraries(root, setup.loaded, setup.device, progress=False, arena=None)
        engine = LLMEngine(engine_config(a, setup.loaded, setup.device), setup.loaded, libraries)
        libraries.add(library)
        return serve(a, setup, engine, "resident")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def to_pinned(library) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The library's pools copied into pinned CPU memory, the device pools freed one by one."""
    pin = torch.cuda.is_available()
    out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for pools, dst in ((library.k_pools, out[0]), (library.v_pools, out[1])):
        for i, t in enumerate(pools):
            dst.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t))
            pools[i] = dst[-1]  # the device tensor goes now
    return out


def run_pinned(a, setup: Setup, library, pools, policy: str) -> dict:
    from moska.library.chunk_store import MemoryChunks
    from moska.library.tiers import ChunkTiers, TierConfig

    m = library.manifest
    budget = int(a.gpu_budget_fraction * kv_bytes(setup.loaded, m.num_tokens))
    slots = max(1, int(a.gpu_budget_fraction * m.num_chunks))
    cfg = TierConfig(gpu_budget=f"{budget}B", miss_policy=policy)
    device = torch.device(setup.device)
    tiers = ChunkTiers(m.chunk_offsets, MemoryChunks(*pools), cfg, device, slots, 1)
    tiered = LoadedLibrary(
        m, library.chunk_offsets, tiers.k_pools, tiers.v_pools, library.routing,
        library.token_ids, tiers=tiers,
    )  # fmt: skip
    root = tempfile.mkdtemp(prefix="moska-big-")
    try:
        libraries = InMemoryLibraries(root, setup.loaded, setup.device, progress=False, arena=None)
        config = engine_config(a, setup.loaded, setup.device, library_gpu_budget=f"{budget}B")
        engine = LLMEngine(config, setup.loaded, libraries)
        libraries.add(tiered)
        row = {
            "library_gpu_budget_gib": budget / 2**30,
            **serve(a, setup, engine, f"pinned-{policy}"),
        }
        row["cpu_tier_pinned_gib"] = sum(t.numel() * t.element_size() for t in pools[0]) * 2
        row["cpu_tier_pinned_gib"] /= 2**30  # the whole library (MemoryChunks: no CPU cache)
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_disk(a, setup: Setup, root: Path, policy: str) -> dict:
    """The engine's own manager loads the saved library into tiers (checksums not verified:
    a load-time cost of reading every byte, not serving)."""
    from moska.engine.engine_factory import make_library_manager

    kv = kv_bytes(setup.loaded, setup.library_tokens)
    budget, cpu = int(a.gpu_budget_fraction * kv), int(a.cpu_budget_fraction * kv)
    dropped = drop_page_cache(root / LIBRARY)
    cfg = {"library_root": str(root), "library_gpu_budget": f"{budget}B"}
    config = engine_config(
        a, setup.loaded, setup.device, **cfg, library_cpu_budget=f"{max(cpu, 1)}B",
        library_miss_policy=policy,
    )  # fmt: skip
    libraries = make_library_manager(config, setup.loaded, setup.device)
    libraries.progress = False
    libraries.load_options["verify_checksums"] = False
    engine = LLMEngine(config, setup.loaded, libraries)
    t0 = time.perf_counter()
    lib = engine.libraries.get(LIBRARY)
    if getattr(lib, "tiers", None) is None:
        raise RuntimeError("the library was loaded wholly onto the device, not in tiers")
    row = {"library_gpu_budget_gib": budget / 2**30, "library_cpu_budget_gib": cpu / 2**30}
    row["load_seconds"], row["page_cache_dropped_files"] = time.perf_counter() - t0, dropped
    row.update(serve(a, setup, engine, f"disk-{policy}"))
    row["disk_bytes_read"] = lib.tiers.cpu.disk.bytes_read
    return row


def kv_bytes(loaded, tokens: int) -> int:
    c = loaded.config
    elem = next(loaded.model.parameters()).element_size()
    return 2 * tokens * c.num_kv_layers * c.num_kv_heads * c.head_dim * elem


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    threads = torch.get_num_threads()
    if a.cpu_dry_run:  # tiny ops: threads only contend
        torch.set_num_threads(1)
    try:
        return run(a, argv)
    finally:
        torch.set_num_threads(threads)


def run(a: argparse.Namespace, argv: list[str] | None) -> dict:
    cfg, dtype, device = dims_config(a.dims, a.cpu_dry_run)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("big_library needs a CUDA GPU (or --cpu-dry-run)")
    loaded = random_loaded_model(cfg, dtype, device, seed=a.seed)
    per_token = kv_bytes(loaded, 1)
    tokens = a.library_tokens
    if tokens is None:
        gib = a.library_gib if a.library_gib is not None else (64.0 if a.dims == "1b" else 16.0)
        tokens = int(gib * 2**30 // per_token) // a.chunk_size * a.chunk_size
    setup = Setup(loaded, device, 16, per_token, tokens, "--library-tokens", False, [], "")
    need = tokens * per_token
    scratch = Path(tempfile.mkdtemp(prefix="moska-big-disk-", dir=a.scratch_dir))
    if "disk" in a.placements and need + (2 << 30) > shutil.disk_usage(scratch).free:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"disk placement: {need / 2**30:.1f} GiB does not fit {scratch}")
    payload: dict[str, Any] = {
        "benchmark": "big_library",
        "environment": {
            **environment(None if argv is None else ["moska.bench.big_library", *argv]),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        },
        "shapes": describe(a, cfg, loaded.config.head_dim, dtype, tokens, per_token),
        "library_kv": "random normal values made on the device, keys scaled per chunk by "
        "1 + skew/(rank+1); not prefilled (a build of this many tokens takes far longer "
        "than the run); mode independent (past the model's context)",
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "notes": NOTES,
        "rows": [],
    }
    out = Path(a.out)

    def attempt(name: str, policy: str | None, fn, *args) -> None:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"placement": name, "miss_policy": policy}
        try:
            row.update(status="ok", **fn(a, setup, *args))
        except Exception as e:  # noqa: BLE001 - one placement failing keeps the others' rows
            row.update(status="failed", reason=repr(e)[:500])
            print(f"{name} {policy}: failed: {e!r}"[:400], flush=True)
        row["seconds"] = time.perf_counter() - t0
        payload["rows"].append(row)
        payload["summary"] = summarize(payload["rows"])
        write_json(out, payload)  # after every row: a timeout keeps what was measured
        free_memory()

    try:
        t0 = time.perf_counter()
        library = make_library(loaded, tokens, a.chunk_size, a.skew, a.seed)
        payload["library_make_seconds"] = time.perf_counter() - t0
        payload["library_index_gib"] = (library.nbytes - need) / 2**30
        if "resident" in a.placements:
            attempt("resident", None, run_resident, library)
        if "disk" in a.placements:
            from moska.library.store import save_library

            t0 = time.perf_counter()
            save_library(library, scratch, progress=False)
            payload["scratch"] = {
                "filesystem": filesystem_of(scratch),
                "save_seconds": time.perf_counter() - t0,
                "bytes": disk_bytes(scratch / LIBRARY),
            }
        pools = to_pinned(library) if "pinned" in a.placements else None
        for policy in a.miss_policies if pools is not None else ():
            attempt("pinned", policy, run_pinned, library, pools, policy)
        del library, pools
        free_memory()
        for policy in a.miss_policies if "disk" in a.placements else ():
            attempt("disk", policy, run_disk, scratch, policy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    payload["complete"] = True
    write_json(out, payload)
    print("summary:", payload.get("summary"), flush=True)
    return payload


if __name__ == "__main__":
    main()
