"""Decode tokens/s of the serving engine's own FlexiCache path (`--flexicache`,
`moska/flexicache/engine_hook.py`, `engine_step.py`) against full KV in the same engine, on a
random Llama-3.1-8B-shaped model (the speed bench's model, `flexicache_speed.py`, which times
the page store's decode loop instead of the engine's).

Each row builds an `LLMEngine` over the one random model, prefills `batch` requests of
`--context` random tokens, runs `--warmup` decode steps (two re-rankings and the hand-off of
old pages to host memory), then times `--steps` `engine.step()` calls: tokens/s = decode
tokens / wall seconds. Rows (`--rows`, name:batch): "full" (full KV; decode steps replayed
from the engine's CUDA graphs), "full-eager" (full KV, `enforce_eager`), "deferred" (the
FlexiCache default: deferred re-ranking with held pages), "step" (`rerank=step`: the pages
a re-ranking picks read in its own step); FlexiCache's plain steps are replayed from CUDA
graphs (`flexicache/engine_graphs.py`), re-ranking steps run eagerly; "-eager" (e.g.
"deferred-eager"): every step eager. A random model's rankings churn: as in the speed bench, a
`--stable-fraction` of (layer, KV head) pairs is forced stable (`FlexiEngine.force_stable`)
with threshold 2 (no other head stable), and `--churn` (default 0.375, the speed bench's: a
stable head replaces that share of its top-K per re-ranking, `ChurnScores`; -1: the random
ranking's own, nearly all of it, which the session-15 first run had: 550K pages fetched).
GPU KV: the engine's blocks in use after the timed
steps (the requests' blocks, their pools) against the blocks full KV holds for them.

Usage: python -m moska.bench.flexicache_engine_speed [--rows deferred:38,full:15,...]
           [--context 4096] [--layers 32] [--cpu-dry-run] [--out ...json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any

import torch

from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model, write_json

TINY = {**LLAMA_3_1_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip


class ChurnScores:
    """The speed bench's churn (`flexicache_speed._ChurnScores`) for the engine: per (layer,
    KV head) (1 - churn) K fixed `hot` pages get a large bonus, the rest of the top-K is
    drawn at random at each re-ranking, so a stable head replaces about churn * K pages per
    re-ranking (0.375: the rate of moska-code-20m at K = 32, threshold 0.75) instead of
    nearly all of them (random keys' rankings)."""

    def __init__(self, flexi, pages: int, churn: float, seed: int) -> None:
        cfg = flexi.cfg
        gen = torch.Generator().manual_seed(seed + 1)
        n_hot = round((1 - churn) * cfg.top_k_pages)
        span = max(pages - cfg.sink_pages - cfg.recent_pages - 1, n_hot)
        shape = (flexi.num_layers, flexi.num_kv_heads)
        hot = torch.rand(*shape, span, generator=gen).argsort(-1)[..., :n_hot] + cfg.sink_pages
        self.bonus = torch.zeros(*shape, pages + 64)
        self.bonus.scatter_(-1, hot, 1e3)
        self.bonus = self.bonus.to(flexi.device)

    def __call__(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        bonus = self.bonus[layer, :, : scores.shape[-1]]
        return scores + bonus + 10 * torch.rand(scores.shape, device=scores.device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_row(loaded, a, mode: str, batch: int, device: str, dtype: str) -> dict[str, Any]:
    """One engine, `batch` requests: prefill, warm-up, timed decode steps."""
    from moska import SamplingParams
    from moska.config import EngineConfig
    from moska.engine.llm_engine import LLMEngine

    bs = a.block_size
    # no request may finish inside the timed steps (a finished one changes the batch: the
    # lists are rebuilt, a step runs eagerly): the first prefilled decode ~batch * context
    # / prefill_tokens steps before the last; the rest are aborted after the timing
    max_tokens = a.warmup + a.steps + 8 + -(-batch * a.context // a.prefill_tokens)
    total = a.context + max_tokens + 4
    per_req = -(-total // bs)
    spec = None
    base, eager = mode.removesuffix("-eager"), mode.endswith("-eager")
    if base in ("deferred", "step"):
        spec = f"{a.flexicache},threshold=2,rerank={base}"
    # FlexiCache: room for one request's page pool beyond its blocks, so that the first
    # hand-off can reserve it (it then releases ~all of its blocks: the rest follow); at B = 15
    # without it most requests found no free block for their pool until others finished
    spare = 8 + (per_req // 2 if spec is not None else 0)
    config = EngineConfig(
        model=None, device=device, dtype=dtype, block_size=bs, num_kv_blocks=batch * per_req + spare,
        max_num_seqs=batch, max_num_batched_tokens=a.prefill_tokens, enable_prefix_caching=False,
        flexicache=spec, enforce_eager=eager,
        attention="torch" if device == "cpu" else "auto",
    )  # fmt: skip
    engine = LLMEngine(config, loaded, None)
    flexi = engine.runner.flexi
    if flexi is not None:
        hkv = flexi.num_kv_heads
        gen = torch.Generator().manual_seed(a.seed)
        forced = torch.rand(flexi.num_layers, hkv, generator=gen) < a.stable_fraction
        flexi.force_stable = forced.to(flexi.device)
        if a.churn >= 0:
            flexi.score_hook = ChurnScores(flexi, per_req, a.churn, a.seed)
    vocab = loaded.config.vocab_size
    gen = torch.Generator().manual_seed(a.seed + batch)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(3, vocab, (a.context,), generator=gen).tolist(),
                           params)  # fmt: skip
    t0 = time.perf_counter()
    started: set[str] = set()
    while len(started) < batch:  # every prompt prefilled, its first token sampled
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    for _ in range(a.warmup):
        engine.step()
    _sync(device)
    t1 = time.perf_counter()
    n_tokens, each, due = 0, [], []
    n_before = len(_requests(engine))
    for _ in range(a.steps):
        if flexi is not None:
            due.append(flexi.clock % flexi.cfg.rerank_interval == 0)
        t = time.perf_counter()
        n_tokens += len(engine.step())
        each.append(1e3 * (time.perf_counter() - t))  # the host's (steps run ahead)
    _sync(device)
    t2 = time.perf_counter()
    bm = engine.block_manager
    used = bm.allocator.num_used
    full_blocks = sum(-(-r.num_tokens // bs) for r in _requests(engine))
    row: dict[str, Any] = {
        "row": mode, "batch": batch, "flexicache": spec, "cuda_graphs": engine.runner.graphs
        is not None, "prefill_and_warmup_s": t1 - t0, "timed_steps": a.steps,
        "decode_tokens": n_tokens, "seconds": t2 - t1,
        "tokens_per_s": n_tokens / max(t2 - t1, 1e-9), "step_ms": 1e3 * (t2 - t1) / a.steps,
        "requests_timed": n_before, "requests_left": len(_requests(engine)),
        "gpu_kv_blocks_used": used, "full_kv_blocks": full_blocks,
        "gpu_kv_fraction": used / max(full_blocks, 1),
    }  # fmt: skip
    row["step_ms_each"] = [round(x, 2) for x in each]  # wall per step, no sync between
    if flexi is not None:
        row["flexi_stats"] = flexi.stats()
        ranked = [x for x, d in zip(each, due) if d]
        plain = sorted(x for x, d in zip(each, due) if not d)
        row["rerank_step_ms"] = sum(ranked) / max(len(ranked), 1)
        row["other_step_ms_median"] = plain[len(plain) // 2] if plain else None
        pg = engine.runner.flexi_graphs
        row["cuda_graphs"] = pg is not None and pg.replays > 0
        if pg is not None:
            row["plain_graphs"] = {"captures": pg.captures, "replays": pg.replays,
                                   "failed": pg.failed}  # fmt: skip
    for i in range(batch):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    del engine, flexi
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _requests(engine) -> list:
    """The engine's unfinished requests (for their lengths)."""
    reqs = (engine.scheduler.get_request(f"r{i}") for i in range(engine.config.max_num_seqs))
    return [r for r in reqs if r is not None]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["row"], r["batch"]): r for r in rows}
    full = [r for r in rows if r["row"] == "full"]
    base = max(full, key=lambda r: r["batch"]) if full else None
    out: dict[str, Any] = {"tokens_per_s": {f"{r['row']}:{r['batch']}": r["tokens_per_s"]
                                            for r in rows}}  # fmt: skip
    if base is not None:
        out["full_batch"] = base["batch"]
        out["speedup_vs_full"] = {
            f"{r['row']}:{r['batch']}": r["tokens_per_s"] / base["tokens_per_s"]
            for r in rows if r["row"] != "full"
        }  # fmt: skip
        same = by.get(("deferred", base["batch"]))
        if same is not None:
            out["gpu_kv_saved_equal_batch"] = 1 - same["gpu_kv_blocks_used"] / max(
                base["gpu_kv_blocks_used"], 1
            )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="deferred:38,full:15,deferred:15,step:38")
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
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = "cpu" if a.cpu_dry_run or not torch.cuda.is_available() else "cuda"
    hf = dict(LLAMA_3_1_8B, num_hidden_layers=a.layers)
    if device == "cpu":  # a tiny model, short contexts, k=2 of 4-token pages, r = 4
        hf, a.context, a.block_size, a.steps, a.warmup = TINY, 96, 4, 6, 10
        a.flexicache, a.prefill_tokens = "k=2,recent=1,sink=1,r=4", 512
        a.rows = ",".join(f"{r.split(':')[0]}:{min(int(r.split(':')[1]), 4)}"
                          for r in a.rows.split(","))  # fmt: skip
    dtype = "float32" if device == "cpu" else "bfloat16"
    loaded = random_loaded_model(hf, getattr(torch, dtype), device, a.seed)
    result: dict[str, Any] = {
        "environment": environment(), "command": " ".join(sys.argv), "device": device,
        "dtype": dtype, "model": "random Llama-3.1-8B-shaped" if device == "cuda" else "tiny",
        "shapes": {"context": a.context, "layers": hf["num_hidden_layers"],
                   "kv_heads": hf["num_key_value_heads"], "block_size": a.block_size,
                   "warmup": a.warmup, "steps": a.steps},
        "flexicache": a.flexicache, "stable_fraction_forced": a.stable_fraction,
        "churn": a.churn, "rows": [],
    }  # fmt: skip
    for item in a.rows.split(","):
        mode, batch = item.split(":")
        row = measure_row(loaded, a, mode, int(batch), device, dtype)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "flexi_stats"}), flush=True)
        result["summary"] = summarize(result["rows"])
        if a.out:  # after each row: a timeout keeps the rows done
            write_json(a.out, result)
    print("summary", json.dumps(result.get("summary")))


if __name__ == "__main__":
    main()
