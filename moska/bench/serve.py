"""Serving benchmark through the real engine (scheduler, runner, sampler, library path, CUDA
graphs on CUDA) at Llama-3.1-8B dims with random weights: N requests, each with its own
prompt of U tokens and G generated tokens, all naming one library, arriving all at once
(burst) and by a Poisson process at a set rate. Variants timed in the same run:

  prefix_cached  no library: the library's tokens as a shared prompt prefix, prefix caching
                 on (what vLLM and SGLang do today), warmed by one request before timing
  all_chunks     the library, every request reads every chunk
  routed_bf16    the library, top-k chunks per request
  routed_fp8     the same library in FP8 KV (e4m3 by the builder's quantizer, moska.library.fp8)
  routed_tiered  routed bf16 saved to disk and served with a GPU chunk budget of 1/4 of its KV
                 (`library_gpu_budget`; pinned CPU holds it all unless --tier-cpu-budget-gib)

The library is the largest the prefix-cached baseline fits (context and memory), so the
summary compares like with like. Variants whose feature the code base lacks are marked
"unavailable". Reports output tokens/s, TTFT and TPOT p50/p99, peak GPU memory, tier hit
rates. JSON (written after every variant) and a plot in bench/results/.

    python -m moska.bench.serve [--requests 256] [--unique-tokens 256] [--max-tokens 64]
    python -m moska.bench.serve --cpu-dry-run   # the tiny model on CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model, write_json
from moska.bench.serve_report import VARIANTS, plot, summarize
from moska.bench.serve_steps import StepRecorder, phase_figures, phase_line, step_log
from moska.bench.serve_workload import (
    InMemoryLibraries,
    Workload,
    drive,
    fp8_build_supported,
    latency_figures,
    random_library,
    random_token_ids,
    tier_delta,
    tier_snapshot,
)
from moska.config import EngineConfig
from moska.engine.llm_engine import LLMEngine

LIBRARY = "serve-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=256, help="N, also max_num_seqs")
    ap.add_argument("--unique-tokens", type=int, default=256, help="U, each request's own")
    ap.add_argument("--max-tokens", type=int, default=64, help="G, generated per request")
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rate", type=float, default=64.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--arrivals", nargs="+", default=["burst", "poisson"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument(
        "--library-tokens",
        type=int,
        default=None,
        help="library size (default: the largest the prefix-cached baseline fits)",
    )
    ap.add_argument("--gpu-memory-gib", type=float, default=120.0, help="memory to size within")
    ap.add_argument("--tier-budget-fraction", type=float, default=0.25)
    ap.add_argument("--tier-cpu-budget-gib", type=float, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ab = "library variants: a run's first S decode steps with library steps synchronous (A/B)"
    ap.add_argument("--sync-ab-steps", type=int, default=0, help=ab)
    ap.add_argument("--step-log", action="store_true", help="every step's record in the JSON")
    ap.add_argument(
        "--profile-steps", type=int, default=0, help="routed_bf16: N decode steps' kernels"
    )
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    ap.add_argument("--scratch-dir", default=None, help="where the tiered library is saved")
    ap.add_argument("--out", default="bench/results/serve.json")
    ap.add_argument("--no-plot", action="store_true", help="JSON only")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the tiny model on CPU")
    return ap.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every variant shares: the model, the device, the library's size and tokens."""

    loaded: Any  # a LoadedModel
    device: str
    block_size: int
    kv_bytes_per_token: int  # all KV layers, k and v
    library_tokens: int
    library_limit: str  # what bounded the library: "context", "memory" or "--library-tokens"
    prefix_fits: bool
    token_ids: list[int]
    dtype: str  # the model's, also its KV's
    # the largest library by context and by memory, in tokens (plan)
    bounds: dict = dataclasses.field(default_factory=dict)


def plan(args: argparse.Namespace, loaded, device: str) -> Setup:
    """The largest library the prefix-cached baseline fits: its tokens plus a request's
    own within the context, its KV plus N requests' within the memory left after weights."""
    c, bs = loaded.config, 16
    elem = next(loaded.model.parameters()).element_size()
    kv_tok = 2 * c.num_kv_layers * c.num_kv_heads * c.head_dim * elem
    own = args.unique_tokens + args.max_tokens
    by_context = (c.max_position_embeddings - own - 1) // args.chunk_size * args.chunk_size
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    spare = args.gpu_memory_gib * 2**30 - weights - 8 * 2**30  # 8 GiB: activations, graphs
    unique_kv = 2 * args.requests * math.ceil((own + 1) / bs) * bs * kv_tok
    by_memory = int((spare - unique_kv) // kv_tok) // args.chunk_size * args.chunk_size
    if device == "cpu":
        by_memory = by_context  # the dry run's sizes are set by hand
    largest, limit = min((by_context, "context"), (by_memory, "memory"))
    tokens, fits = largest, True
    if args.library_tokens is not None:
        tokens, limit, fits = (
            args.library_tokens,
            "--library-tokens",
            args.library_tokens <= largest,
        )
    if tokens < args.chunk_size:
        raise SystemExit(f"no library of one {args.chunk_size}-token chunk fits ({limit})")
    ids = random_token_ids(tokens, c.vocab_size, seed=1)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    bounds = {"by_context": by_context, "by_memory": by_memory}
    return Setup(loaded, device, bs, kv_tok, tokens, limit, fits, ids, dtype, bounds)


def engine_config(s: Setup, args, top_k: int, extra_blocks: int = 0, **cfg) -> EngineConfig:
    """Sized for N concurrent requests (twice their KV: two runs back to back)."""
    own = args.unique_tokens + args.max_tokens
    max_len = s.library_tokens + own  # the library's positions come first either way
    per_req = math.ceil((own + 1) / s.block_size)
    blocks = max(2 * args.requests * per_req, math.ceil(max_len / s.block_size)) + 64
    share = 0.85
    if s.device == "cuda":  # the whole engine within --gpu-memory-gib
        share = min(
            0.98, args.gpu_memory_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory
        )
    return EngineConfig(
        model=None if s.device == "cpu" else "random-llama-3.1-8b",
        device=s.device,
        num_kv_blocks=blocks + extra_blocks,
        max_model_len=max_len,
        gpu_memory_utilization=share,
        max_num_seqs=args.requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        default_top_k_chunks=top_k,
        **cfg,
    )


def make_engine(s: Setup, config: EngineConfig, libraries=None) -> LLMEngine:
    """An engine on the shared model; by default with a manager of in-memory libraries."""
    if libraries is None:
        libraries = InMemoryLibraries(
            tempfile.mkdtemp(prefix="moska-serve-"), s.loaded, s.device, progress=False
        )
    return LLMEngine(config, s.loaded, libraries)


def measure(engine: LLMEngine, s: Setup, args, name: str, *, prefix=None, library=None) -> dict:
    """Warm up (one request, then two: Triton compiles, the prefix gets cached; on CPU one),
    capture the decode graphs, then time each arrival pattern on the same engine."""
    vocab = s.loaded.config.vocab_size
    t0 = time.perf_counter()
    for n in (1, 2) if s.device == "cuda" else (1,):
        warm = Workload.make(n, args.unique_tokens, 2, vocab, None, seed=10_000 + n)
        drive(engine, warm, f"{name}-warm{n}", prefix=prefix, library=library)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    graphs = engine.capture_graphs(progress=False)
    result: dict[str, Any] = {"warmup_seconds": warm_s, "graphs_captured": graphs}
    # (big_library's measure calls pass their own arguments: these two may be absent)
    sync_ab = getattr(args, "sync_ab_steps", 0) if library is not None else 0
    profile = getattr(args, "profile_steps", 0) if name == "routed_bf16" else 0
    recorder = StepRecorder(engine, sync_ab, profile)
    result["graph_capture_seconds"] = time.perf_counter() - t0
    runs = []
    for pattern in args.arrivals:
        rate = None if pattern == "burst" else args.rate
        work = Workload.make(
            args.requests, args.unique_tokens, args.max_tokens, vocab, rate, seed=0
        )
        lib = engine.libraries.get(library) if library is not None else None
        before, tiers = engine.stats(), tier_snapshot(lib)
        tag = f"{name}-{pattern}"
        recorder.reset()
        timings, wall, adding = drive(
            engine, work, tag, prefix=prefix, library=library, step=recorder.step
        )
        recorder.finish()
        after = engine.stats()
        run = {"arrivals": work.pattern, **latency_figures(timings, wall)}
        run["phases"] = phase_figures(recorder.records, args.requests)
        if recorder.profile is not None:
            run["profile"] = recorder.profile
        if getattr(args, "step_log", False):
            run["step_log"] = step_log(recorder.records)
        run["add_request_seconds"] = adding
        run["steps"] = after.steps - before.steps
        run["prompt_tokens_computed"] = after.prompt_tokens_computed - before.prompt_tokens_computed
        run["tiers"] = tier_delta(tiers, tier_snapshot(lib))
        runs.append(run)
        print(
            f"{name:>14} {work.pattern:>12} {run['output_tokens_per_s']:>10.1f} tok/s "
            f"TTFT p50 {run['ttft_p50_s']:.3f} s p99 {run['ttft_p99_s']:.3f} s "
            f"TPOT p50 {1e3 * (run['tpot_p50_s'] or 0):.1f} ms; "
            f"{phase_line(run['phases'])}",
            flush=True,
        )
    result["runs"] = runs
    return result


def free_memory() -> None:
    if torch.cuda.is_available():  # (a collection costs seconds on a busy CPU: CUDA only)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def config_has(field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(EngineConfig)}


def run_variant(name: str, s: Setup, args, lib_holder: dict) -> dict:
    """One variant: its engine, its measurement, its memory; the bf16 library is made once
    and kept in `lib_holder` for the variants that read it."""
    row: dict = {"variant": name, "library_tokens": s.library_tokens}
    chunks = math.ceil(s.library_tokens / args.chunk_size)
    if name == "prefix_cached":
        if not s.prefix_fits:
            return {**row, "status": "does_not_fit", "reason": "library over context/memory"}
        blocks = math.ceil(s.library_tokens / s.block_size)
        engine = make_engine(s, engine_config(s, args, args.top_k, blocks))
        row.update(top_k=None, kv_dtype=s.dtype, prefix_caching=True)
        return {**row, "status": "ok", **measure(engine, s, args, name, prefix=s.token_ids)}
    if name == "routed_fp8" and not fp8_build_supported():
        return {**row, "status": "unavailable", "reason": "library build has no kv_dtype"}
    if name == "routed_tiered" and not config_has("library_gpu_budget"):
        return {**row, "status": "unavailable", "reason": "no library_gpu_budget config field"}
    if "bf16" not in lib_holder and name in ("routed_bf16", "all_chunks", "routed_tiered"):
        t0 = time.perf_counter()
        lib_holder["bf16"] = random_library(s.loaded, s.token_ids, args.chunk_size, LIBRARY)
        lib_holder["make_seconds"] = time.perf_counter() - t0
    top_k = chunks if name == "all_chunks" else min(args.top_k, chunks)
    kv_dtype = "fp8" if name == "routed_fp8" else s.dtype
    row.update(num_chunks=chunks, top_k=top_k, kv_dtype=kv_dtype)
    if name == "routed_tiered":
        return {**row, **run_tiered(s, args, lib_holder, top_k)}
    if name == "routed_fp8":
        library = random_library(s.loaded, s.token_ids, args.chunk_size, LIBRARY, "fp8")
    else:
        library = lib_holder["bf16"]
    row["library_kv"] = "random values (no prefill)"
    if name == "routed_fp8":
        row["library_kv"] += ", e4m3 by the builder's quantizer (moska.library.fp8)"
    row["library_gib"] = library.nbytes / 2**30
    engine = make_engine(s, engine_config(s, args, top_k))
    engine.libraries.add(library)
    return {**row, "status": "ok", **measure(engine, s, args, name, library=LIBRARY)}


def run_tiered(s: Setup, args, lib_holder: dict, top_k: int) -> dict:
    """Save the bf16 library, then serve it through the engine's own library manager with
    a GPU budget of `--tier-budget-fraction` of its KV bytes (the tiers load it)."""
    from moska.engine.engine_factory import make_library_manager  # the engine's own manager
    from moska.library.store import save_library

    library = lib_holder.pop("bf16")
    kv_bytes = s.library_tokens * s.kv_bytes_per_token
    budget = kv_bytes * args.tier_budget_fraction / 2**30
    root = Path(tempfile.mkdtemp(prefix="moska-serve-tiers-", dir=args.scratch_dir))
    try:
        t0 = time.perf_counter()
        save_library(library, root, progress=False)
        save_s = time.perf_counter() - t0
        del library
        free_memory()
        cfg: dict[str, Any] = {
            "library_root": str(root),
            "library_gpu_budget": f"{int(budget * 2**30)}B",
        }
        if args.tier_cpu_budget_gib is not None:
            cfg["library_cpu_budget"] = f"{int(args.tier_cpu_budget_gib * 2**30)}B"
        config = engine_config(s, args, top_k, **cfg)
        libraries = make_library_manager(config, s.loaded, s.device)
        libraries.progress = False
        engine = make_engine(s, config, libraries)
        loaded = engine.libraries.get(LIBRARY)  # loaded before graphs are captured
        if getattr(loaded, "tiers", None) is None:
            raise RuntimeError("the library was loaded wholly onto the device, not in tiers")
        row = {"status": "ok", "library_gpu_budget_gib": budget, "library_gib": kv_bytes / 2**30}
        row["gpu_slots"] = loaded.tiers.num_slots
        row["tier_config"] = dataclasses.asdict(loaded.tiers.config)
        row["library_save_seconds"] = save_s
        return {**row, **measure(engine, s, args, "routed_tiered", library=LIBRARY)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.cpu_dry_run:  # tiny ops: threads only contend (30x slower on a shared CPU)
        torch.set_num_threads(1)
    try:
        run(args, argv)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str] | None) -> None:
    if args.cpu_dry_run:
        from moska.model.default import CONFIG

        cfg, dtype, device = dict(CONFIG, num_hidden_layers=2), torch.float32, "cpu"
        args.requests, args.unique_tokens, args.max_tokens = 3, 8, 3
        args.chunk_size, args.top_k, args.rate = 32, 2, 400.0
        args.library_tokens = args.library_tokens or 128
        args.max_num_batched_tokens = 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the serving benchmark needs a CUDA GPU (or --cpu-dry-run)")
        cfg, dtype, device = dict(LLAMA_3_1_8B), torch.bfloat16, "cuda"
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
    loaded = random_loaded_model(cfg, dtype, device)
    s = plan(args, loaded, device)
    payload: dict[str, Any] = {
        "environment": {
            **environment(None if argv is None else ["moska.bench.serve", *argv]),
            "device": device,
        },
        "shapes": {
            "model": "Llama-3.1-8B dims, random weights" if device == "cuda" else "tiny, random",
            "layers": loaded.config.num_layers,
            "dtype": str(dtype).removeprefix("torch."),
            "requests": args.requests,
            "unique_tokens": args.unique_tokens,
            "max_tokens": args.max_tokens,
            "chunk_size": args.chunk_size,
            "top_k": args.top_k,
            "poisson_rate": args.rate,
            "library_tokens": s.library_tokens,
            "library_limit": s.library_limit,
            "library_bounds_tokens": s.bounds,
            "kv_bytes_per_token": s.kv_bytes_per_token,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        },
        "rows": [],
        "complete": False,
    }
    out = Path(args.out)
    lib_holder: dict = {}
    for name in [v for v in VARIANTS if v in args.variants]:
        free_memory()
        resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
        t0 = time.perf_counter()
        try:
            row = run_variant(name, s, args, lib_holder)
        except Exception as e:  # noqa: BLE001 - one variant failing keeps the others' figures
            row = {"variant": name, "status": "failed", "reason": repr(e)[:500]}
            print(f"{name}: failed: {e!r}"[:400], flush=True)
        row["seconds"] = time.perf_counter() - t0
        row["peak_gpu_memory_gib"] = peak_gib()
        row["gpu_memory_at_start_gib"] = resident  # weights (+ the bf16 library once made)
        if name == "routed_bf16" and "make_seconds" in lib_holder:
            row["library_make_seconds"] = lib_holder["make_seconds"]
        if row["status"] != "ok":
            print(f"{name:>14} {row['status']}: {row.get('reason')}", flush=True)
        payload["rows"].append(row)
        payload["summary"] = summarize(payload["rows"], args, s)
        write_json(out, payload)  # after every variant: a timeout keeps what was measured
    payload["complete"] = True
    payload["plot"] = (
        "skipped: --no-plot" if args.no_plot else plot(payload["rows"], out.with_suffix(".png"))
    )
    write_json(out, payload)
    print("summary:", payload["summary"])


if __name__ == "__main__":
    main()
