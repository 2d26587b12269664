"""Decode tokens/s of the serving engine's own FlexiCache path (`--flexicache`,
`moska/flexicache/engine_hook.py`, `engine_step.py`) against full KV in the same engine, on a
random Llama-3.1-8B-shaped model (the speed bench's model, `flexicache_speed.py`, which times
the page store's decode loop instead of the engine's), in ONE GPU KV budget.

`--budget full:15` (default): every row's engine gets the blocks full KV needs for 15
requests of `--context` tokens plus their decode (`gib:G`: G GiB of blocks; `none`: each row
sized for its own batch, the session-15 form, where FlexiCache's rows had room for their
batch as full KV). Rows (`--rows`, name:batch): "full" (full KV; decode steps replayed from
the engine's CUDA graphs), "full-eager", "deferred" (the FlexiCache default: deferred
re-ranking with held pages), "step" (`rerank=step`), "shared" (deferred, one page-pool
slot space for all layers: `slots=shared`), "default" (`--flexicache on` exactly, its own
threshold; only the host pool from `--host-gib`); "-eager" (e.g. "deferred-eager"): every
step eager; "@kernel" / "@large": A/B variants (`_variant`). Batch "fit": the largest batch that fits in the budget, found by the engine
itself: requests are added in waves, as many as the free blocks hold at full KV (prompt, one
decode block, and each running request's growth over the rest of the run), each wave
prefilled and decoded until its requests have handed their old pages to the host (stable
heads keep top-K + sink + recent pages on the GPU, unstable heads all; the rest in the
pinned host pool, `host=` GiB), until the next request no longer fits. Then `--warmup` decode
steps, then `--steps` timed `engine.step()` calls: tokens/s = decode tokens / wall seconds.
GPU KV held: the engine's blocks in use (requests' blocks and page pools), peak over the
timed steps; preemptions are counted (a row with any did not fit).

A random model's rankings churn: as in the speed bench, a `--stable-fraction` of (layer, KV
head) pairs is forced stable (`FlexiEngine.force_stable`) with threshold 2 (no other head
stable; a "default" row keeps its threshold, and the other heads' random rankings overlap
far below it: each row's `stability` says how many were stable), and `--churn` (default 0.375, the speed bench's: a stable head replaces that share
of its top-K per re-ranking, `ChurnScores`; -1: the random ranking's own). Loss of the same
configuration on the quality model: `flexicache_engine_quality.py`.

Usage: python -m moska.bench.flexicache_engine_speed [--rows full:15,deferred:fit,...]
           [--budget full:15|gib:G|none] [--context 4096] [--cpu-dry-run] [--out ...json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from contextlib import contextmanager
from typing import Any

import torch

from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model, write_json
from moska.bench.flexicache_engine_churn import ChurnScores
from moska.bench.flexicache_engine_report import stability, summarize

TINY = {**LLAMA_3_1_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _blocks_for(a, batch: int) -> tuple[int, int]:
    """(max_tokens, blocks per request) of a row of `batch` requests that all decode through
    the timed steps (the first prefilled decodes ~batch * context / prefill_tokens steps
    before the last; the rest are aborted after the timing)."""
    max_tokens = a.warmup + a.steps + 8 + -(-batch * a.context // a.prefill_tokens)
    return max_tokens, -(-(a.context + max_tokens + 4) // a.block_size)


def budget_blocks(a, block_bytes: int) -> int | None:
    """GPU KV blocks every row gets (`--budget`), None: each row its own."""
    kind, _, val = a.budget.partition(":")
    if kind == "none":
        return None
    if kind == "full":
        batch = int(val)
        return batch * _blocks_for(a, batch)[1] + 8
    if kind == "gib":
        return int(float(val) * 2**30) // block_bytes
    raise SystemExit(f"--budget {a.budget!r}: use full:B, gib:G or none")


def measure_row(
    loaded, a, mode: str, batch: int | None, device: str, dtype: str, budget: int | None
) -> dict[str, Any]:
    """One engine: `batch` requests (None: as many as fit, `_admit_fit`), warm-up, timed
    decode steps."""
    mode, _, variant = mode.partition("@")
    with _variant(variant):
        row = _measure(loaded, a, mode, batch, device, dtype, budget)
    if variant:
        row["row"] = f"{mode}@{variant}"
    return row


@contextmanager
def _variant(name: str):
    """A row's A/B variant (`shared@kernel:fit`): "kernel", a hand-off's host copies by one
    in-place kernel write instead of per-layer copies (the default); "large", re-ranking
    fetch lists of up to 1 << 18 entries per call instead of 1 << 16."""
    from moska.flexicache import offload_sync, shared_slots, transfer

    saved = (transfer.HOST_WRITE_KERNEL, offload_sync.MAX_ENTRIES, shared_slots.MAX_ENTRIES)
    if name not in ("", "kernel", "large"):
        raise SystemExit(f"row variant @{name}: use @kernel or @large")
    if name == "kernel":
        transfer.HOST_WRITE_KERNEL = True
    if name == "large":
        offload_sync.MAX_ENTRIES = shared_slots.MAX_ENTRIES = 1 << 18
    try:
        yield
    finally:
        transfer.HOST_WRITE_KERNEL, offload_sync.MAX_ENTRIES, shared_slots.MAX_ENTRIES = saved


def _measure(loaded, a, mode, batch, device, dtype, budget) -> dict[str, Any]:
    from moska import SamplingParams
    from moska.config import EngineConfig
    from moska.engine.llm_engine import LLMEngine

    bs = a.block_size
    max_tokens, per_req = _blocks_for(a, batch or a.max_batch)
    spec = None
    base, eager = mode.removesuffix("-eager"), mode.endswith("-eager")
    if base in ("deferred", "step", "shared"):  # shared: one slot space for all layers
        mode_spec = "rerank=deferred,slots=shared" if base == "shared" else f"rerank={base}"
        spec = f"{a.flexicache},threshold=2,{mode_spec},host={a.host_gib}"
    elif base == "default":  # `--flexicache on` as users get it (its own threshold)
        spec = f"host={a.host_gib}"  # the CPU form: its page sizes (K, recent, sink, r)
        spec = f"{a.flexicache},{spec}" if device == "cpu" else spec
    elif base != "full":
        raise SystemExit(f"row {mode!r}: use full, deferred, step, shared or default")
    if budget is None:  # the session-15 sizing: room for the batch at full KV (and a pool)
        budget = (batch or a.max_batch) * per_req + 8 + (per_req // 2 if spec else 0)
    config = EngineConfig(
        model=None, device=device, dtype=dtype, block_size=bs, num_kv_blocks=budget,
        max_num_seqs=batch or a.max_batch, max_num_batched_tokens=a.prefill_tokens,
        enable_prefix_caching=False, flexicache=spec, enforce_eager=eager,
        attention="torch" if device == "cpu" else "auto",
    )  # fmt: skip
    t0 = time.perf_counter()
    with _one_host_pool():
        engine = LLMEngine(config, loaded, None)
    startup_s = time.perf_counter() - t0
    sched = engine.scheduler
    preempted = [0]
    preempt = sched._preempt

    def counted(request) -> None:
        preempted[0] += 1
        preempt(request)

    sched._preempt = counted  # type: ignore[method-assign]
    flexi = engine.runner.flexi
    if flexi is not None:
        hkv = flexi.num_kv_heads
        gen = torch.Generator().manual_seed(a.seed)
        forced = torch.rand(flexi.num_layers, hkv, generator=gen) < a.stable_fraction
        flexi.force_stable = forced.to(flexi.device)
        if a.churn >= 0:
            cap = -(-(a.context + max_tokens + a.max_batch * 64) // bs)
            flexi.score_hook = ChurnScores(
                flexi, -(-a.context // bs), cap, a.churn, a.seed, only=forced
            )
    vocab = loaded.config.vocab_size
    gen = torch.Generator().manual_seed(a.seed + (batch or 0))
    # a fit row's first requests decode through every wave: as long as the cache allows
    long_tokens = max_tokens if batch else budget * bs - a.context - 2 * bs
    params = SamplingParams(temperature=0, max_tokens=long_tokens, ignore_eos=True)

    def add(eng, i: int) -> None:
        prompt = torch.randint(3, vocab, (a.context,), generator=gen).tolist()
        eng.add_request(f"r{i}", prompt, params)

    t0 = time.perf_counter()
    waves: list[int] = []
    if batch:
        for i in range(batch):
            add(engine, i)
        _until_started(engine, [f"r{i}" for i in range(batch)])
    else:
        batch, waves = _admit_fit(engine, a, add, budget)
    for _ in range(a.warmup):
        engine.step()
    _sync(device)
    t1 = time.perf_counter()
    n_tokens, each, due, peak = 0, [], [], 0
    ext0 = flexi.extensions if flexi is not None else 0
    n_before = len(_requests(engine))
    bm = engine.block_manager
    for _ in range(a.steps):
        if flexi is not None:
            due.append(flexi.clock % flexi.cfg.rerank_interval == 0)
        t = time.perf_counter()
        n_tokens += len(engine.step())
        each.append(1e3 * (time.perf_counter() - t))  # the host's (steps run ahead)
        peak = max(peak, bm.allocator.num_used)
    _sync(device)
    t2 = time.perf_counter()
    used = bm.allocator.num_used
    block_bytes = _block_bytes(engine)
    full_blocks = sum(-(-r.num_tokens // bs) for r in _requests(engine))
    row: dict[str, Any] = {
        "row": mode, "batch": batch, "fit": bool(waves), "waves": waves,
        "flexicache": spec, "budget_blocks": budget, "budget_gib": budget * block_bytes / 2**30,
        "engine_startup_s": startup_s, "prefill_and_warmup_s": t1 - t0,
        "timed_steps": a.steps, "decode_tokens": n_tokens, "seconds": t2 - t1,
        "tokens_per_s": n_tokens / max(t2 - t1, 1e-9), "step_ms": 1e3 * (t2 - t1) / a.steps,
        "requests_timed": n_before, "requests_left": len(_requests(engine)),
        "preemptions": preempted[0], "gpu_kv_blocks_used": used, "gpu_kv_blocks_peak": peak,
        "gpu_kv_gib_peak": peak * block_bytes / 2**30, "full_kv_blocks": full_blocks,
        "gpu_kv_fraction": used / max(full_blocks, 1),
        "mean_context": sum(r.num_tokens for r in _requests(engine)) / max(n_before, 1),
    }  # fmt: skip
    row["step_ms_each"] = [round(x, 2) for x in each]  # wall per step, no sync between
    if flexi is not None:
        row["flexi_stats"] = flexi.stats()
        row["flexicache_config"] = dataclasses.asdict(flexi.cfg)
        row["stability"] = stability(flexi, a.churn)
        row["extensions_timed"] = flexi.extensions - ext0  # later hand-offs in the window
        ranked = [x for x, d in zip(each, due) if d]
        plain = sorted(x for x, d in zip(each, due) if not d)
        row["rerank_step_ms"] = sum(ranked) / max(len(ranked), 1)
        row["other_step_ms_median"] = plain[len(plain) // 2] if plain else None
        pg = engine.runner.flexi_graphs
        row["cuda_graphs"] = pg is not None and pg.replays > 0
        if pg is not None:
            row["plain_graphs"] = {"captures": pg.captures, "replays": pg.replays,
                                   "failed": pg.failed}  # fmt: skip
    else:
        row["cuda_graphs"] = engine.runner.graphs is not None
    if flexi is not None and a.profile_steps:  # where the steps' time goes (synced, apart)
        from moska.bench.flexicache_engine_profile import profile_steps

        row["profile"] = profile_steps(engine, a.profile_steps)
    for r in _requests(engine):
        engine.abort_request(r.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    del engine, flexi
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


_POOLS: dict = {}


@contextmanager
def _one_host_pool():
    """Every row's engine takes the same host pool (pinned once: ~0.6 s per GiB on the
    H200 host; the rows' requests have all given their pages back before the next row)."""
    from moska.flexicache import engine_hook

    make = engine_hook.make_host_pool

    def cached(cfg, k_cache, device):
        key = (cfg.host_gib, tuple(k_cache.shape[0:1]) + tuple(k_cache.shape[2:]), k_cache.dtype)
        if key not in _POOLS:
            _POOLS[key] = make(cfg, k_cache, device)
        pool = _POOLS[key]
        assert pool is None or pool.used_pages == 0
        return pool

    engine_hook.make_host_pool = cached
    try:
        yield
    finally:
        engine_hook.make_host_pool = make


def _until_started(engine, ids: list[str]) -> None:
    """Step until every request in `ids` is prefilled and has sampled its first token."""
    started: set[str] = set()
    while not started.issuperset(ids):
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)


def _admit_fit(engine, a, add, budget: int) -> tuple[int, list[int]]:
    """Add requests in waves while the free blocks hold one more at full KV (its prompt and
    a decode block) beside every running request's growth until the run ends; each wave is
    decoded until its requests have handed off (or will not). Returns (batch, wave sizes)."""
    bm, flexi, bs = engine.block_manager, engine.runner.flexi, a.block_size
    need = -(-a.context // bs) + 1
    grow = -(-(a.warmup + a.steps + 2 * a.rerank) // bs) + 1
    n, waves = 0, []
    while n < a.max_batch:
        free = bm.allocator.num_available - n * grow
        k = min(free // (need + grow), a.max_batch - n)
        if k <= 0:
            break
        ids = [f"r{n + i}" for i in range(k)]
        for i in range(k):
            add(engine, n + i)
        n += k
        waves.append(k)
        _until_started(engine, ids)
        if flexi is None:
            continue
        for _ in range(4 * a.rerank + 8):  # two re-rankings classify; then the hand-off
            states = [flexi.requests.get(rid) for rid in ids]
            if all(st is not None and (st.off is not None or st.keep_all) for st in states):
                break
            engine.step()
    return n, waves


def _block_bytes(engine) -> int:
    """GPU bytes of one KV block: K and V of every layer."""
    k = engine.runner.cache.k
    return 2 * sum(t[0].numel() * t.element_size() for t in k)


def _requests(engine) -> list:
    """The engine's unfinished requests (for their lengths)."""
    reqs = (engine.scheduler.get_request(f"r{i}") for i in range(engine.config.max_num_seqs))
    return [r for r in reqs if r is not None]


def main(argv: list[str] | None = None) -> None:
    from moska.flexicache.config import FlexiCacheConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="full:15,deferred:fit,deferred:15")
    ap.add_argument("--budget", default="full:15",
                    help="GPU KV blocks of every row: full:B (what full KV needs for B "
                         "requests), gib:G, or none (each row its own)")  # fmt: skip
    ap.add_argument("--max-batch", type=int, default=64, help="cap of a fit row's batch")
    ap.add_argument("--host-gib", default="48", help="FlexiCache's host pool (host=)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--flexicache", default="k=32,recent=2,sink=1,r=16")
    ap.add_argument("--stable-fraction", type=float, default=0.75)
    ap.add_argument("--churn", type=float, default=0.375,
                    help="share of a stable head's K replaced per re-ranking, as the speed "
                         "bench's --churn (-1: the random model's own rankings)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=34, help="untimed decode steps (2 r + 2)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="FlexiCache rows: this many more steps under torch.profiler "
                         "(`flexicache_engine_profile.py`), after the timed ones")  # fmt: skip
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = "cpu" if a.cpu_dry_run or not torch.cuda.is_available() else "cuda"
    hf = dict(LLAMA_3_1_8B, num_hidden_layers=a.layers)
    if device == "cpu":  # a tiny model, short contexts, k=2 of 4-token pages, r = 4
        hf, a.context, a.block_size, a.steps, a.warmup = TINY, 96, 4, 6, 10
        a.flexicache, a.prefill_tokens, a.max_batch = "k=2,recent=1,sink=1,r=4", 512, 12
        a.host_gib = "0.05"

        def small(item: str) -> str:
            name, _, b = item.partition(":")
            return f"{name}:{b if b == 'fit' else min(int(b), 4)}"

        a.rows = ",".join(small(r) for r in a.rows.split(","))
        if a.budget.startswith("full:"):
            a.budget = f"full:{min(int(a.budget[5:]), 4)}"
    a.rerank = FlexiCacheConfig.parse(a.flexicache).rerank_interval
    dtype = "float32" if device == "cpu" else "bfloat16"
    esz = 4 if device == "cpu" else 2
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    block_bytes = 2 * hf["num_hidden_layers"] * a.block_size * hf["num_key_value_heads"]
    block_bytes *= head_dim * esz
    budget = budget_blocks(a, block_bytes)
    loaded = random_loaded_model(hf, getattr(torch, dtype), device, a.seed)
    result: dict[str, Any] = {
        "environment": environment(), "command": " ".join(sys.argv), "device": device,
        "dtype": dtype, "model": "random Llama-3.1-8B-shaped" if device == "cuda" else "tiny",
        "shapes": {"context": a.context, "layers": hf["num_hidden_layers"],
                   "kv_heads": hf["num_key_value_heads"], "block_size": a.block_size,
                   "warmup": a.warmup, "steps": a.steps, "block_bytes": block_bytes},
        "budget": a.budget, "budget_blocks": budget, "host_gib": a.host_gib,
        "flexicache": a.flexicache, "stable_fraction_forced": a.stable_fraction,
        "churn": a.churn, "rows": [],
    }  # fmt: skip
    for item in a.rows.split(","):
        mode, _, b = item.partition(":")
        batch = None if b == "fit" else int(b)
        row = measure_row(loaded, a, mode, batch, device, dtype, budget)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "flexi_stats"}), flush=True)
        result["summary"] = summarize(result["rows"])
        if a.out:  # after each row: a timeout keeps the rows done
            write_json(a.out, result)
    print("summary", json.dumps(result.get("summary")))


if __name__ == "__main__":
    main()
