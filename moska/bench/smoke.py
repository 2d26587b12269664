"""GPU smoke run: generate with a Llama-3.1-8B-shaped random model in bf16 through the full
engine (scheduler, paged KV, Triton attention) and print tokens/s.

    python -m moska.bench.smoke [--batch 1 16 64] [--prompt-len 512] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model, write_json
from moska.config import EngineConfig
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams


def run(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int) -> dict:
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(vocab) for _ in range(prompt_len)]
        engine.add_request(f"b{batch}-{i}", ids, params)
    t0 = time.perf_counter()
    first = None
    tokens = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter() - t0
        tokens += sum(len(o.new_token_ids) for o in outs)
    total = time.perf_counter() - t0
    decode_s = total - (first or 0)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "seconds": total,
        "time_to_first_token_s": first,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / total,
        "decode_tokens_per_s": (tokens - batch) / decode_s if decode_s > 0 else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench/results/smoke.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the smoke benchmark needs a CUDA GPU")
    loaded = random_loaded_model(LLAMA_3_1_8B, torch.bfloat16, "cuda")
    rows = []
    # decode steps run eagerly, or replay CUDA graphs; graph_sync: graphs without
    # asynchronous scheduling (the host waits for each step's tokens before the next)
    for mode in ("eager", "graph_sync", "graph"):
        config = EngineConfig(
            model="random-llama-3.1-8b",
            device="cuda",
            num_kv_blocks=8192,
            max_num_batched_tokens=8192,
            enforce_eager=mode == "eager",
            async_scheduling=mode != "graph_sync",
        )
        engine = LLMEngine(config, loaded)
        if mode != "eager":  # every bucket up front, as `moska serve` does at startup
            mem0, t0 = torch.cuda.memory_reserved(), time.perf_counter()
            captured = engine.capture_graphs()
            capture: dict[str, Any] = {
                "graphs": captured,
                "seconds": time.perf_counter() - t0,
                "reserved_mib": (torch.cuda.memory_reserved() - mem0) / 2**20,
            }
        for b in args.batch:  # warm-up: Triton compiles here
            run(engine, b, 64, 3)
        for b in args.batch:
            rows.append({"mode": mode, **run(engine, b, args.prompt_len, args.max_tokens)})
        if mode == "graph":  # captures after the startup ones: should be none
            g = engine.runner.graphs
            capture["later_captures"] = None if g is None else g.captures - captured
        del engine
        torch.cuda.empty_cache()
    speedup: dict[str, float] = {}
    for b in args.batch:
        e, gr = (
            next(r for r in rows if r["mode"] == m and r["batch"] == b) for m in ("eager", "graph")
        )
        if e["decode_tokens_per_s"] and gr["decode_tokens_per_s"]:
            speedup[f"graph_decode_speedup_b{b}"] = (
                gr["decode_tokens_per_s"] / e["decode_tokens_per_s"]
            )
        s = next(r for r in rows if r["mode"] == "graph_sync" and r["batch"] == b)
        if s["decode_tokens_per_s"] and gr["decode_tokens_per_s"]:
            speedup[f"async_decode_speedup_b{b}"] = (
                gr["decode_tokens_per_s"] / s["decode_tokens_per_s"]
            )
    payload = {
        "environment": environment(),
        "model": "Llama-3.1-8B shape, random bf16",
        "rows": rows,
        "graph_capture": capture,
        "summary": speedup,
    }
    write_json(args.out, payload)
    print(f"{'mode':>10} {'batch':>6} {'TTFT s':>8} {'tok/s':>10} {'decode tok/s':>13}")
    for r in rows:
        print(
            f"{r['mode']:>10} {r['batch']:>6} {r['time_to_first_token_s']:>8.3f} "
            f"{r['tokens_per_s']:>10.1f} {r['decode_tokens_per_s'] or 0:>13.1f}"
        )
    print("graph capture:", capture)
    print("summary:", speedup)


if __name__ == "__main__":
    main()
