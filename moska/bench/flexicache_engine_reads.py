"""Host reads (waits on the device on CUDA) of FlexiCache in the serving engine, per step:
what `moska/flexicache/engine_hook.py` and `offload.py` read back at re-ranking steps with
offloaded requests, at hand-offs and at other steps. The rest of the engine's step
(scheduler, sampling) and the decode kernel are not counted (`host_reads.py` counts the
calls that read device values, on any device: a CPU run shows what would wait on a GPU).

Usage: python -m moska.bench.flexicache_engine_reads [--requests 8] [--tokens 24]
           [--model DIR] [--num-kv-blocks N] [--no-count] [--cpu-dry-run] [--out ...json]
(no model: the built-in tiny model; --cpu-dry-run: 4 requests, 12 tokens, on the CPU;
--no-count: step wall times without the counting's overhead, nothing counted)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moska.bench.common import environment, write_json
from moska.flexicache import host_reads
from moska.flexicache.engine_hook import FlexiEngine, FlexiStep


@contextmanager
def flexi_reads_only() -> Iterator[None]:
    """Inside it, a `count_host_reads` block counts only the reads made by FlexiCache's
    engine hook (`begin`, `begin_mixed`, `attend`, `patch`), not the decode kernel's."""
    depth = [0]

    def counted(fn: Callable, decode_at: int | None = None) -> Callable:
        def wrapper(*args, **kwargs):
            if decode_at is not None and len(args) > decode_at:
                args = (
                    *args[:decode_at],
                    host_reads.uncounted(args[decode_at]),
                    *args[decode_at + 1 :],
                )
            reads = host_reads._current[-1] if host_reads._current else None
            if reads is not None and depth[0] == 0:
                reads.pause -= 1
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if reads is not None and depth[0] == 0:
                    reads.pause += 1

        return wrapper

    saved = [
        (FlexiEngine, "begin", None), (FlexiEngine, "begin_mixed", None),
        (FlexiStep, "attend", 5), (FlexiStep, "patch", 7),
    ]  # fmt: skip
    originals = [(cls, name, getattr(cls, name)) for cls, name, _ in saved]
    try:
        for cls, name, at in saved:
            setattr(cls, name, counted(getattr(cls, name), at))
        yield
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


def counted_step(engine, count: bool = True) -> tuple[list, dict[str, Any]]:
    """One `engine.step()`; (its outputs, the FlexiCache hook's host reads in it and what
    the step did: a re-ranking with offloaded requests, hand-offs, extensions)."""
    flexi: FlexiEngine = engine.runner.flexi
    offloads, extensions = flexi.offloads, flexi.extensions
    due = flexi.clock % flexi.cfg.rerank_interval == 0  # every request re-ranks then
    due_offloaded = sum(due and st.off is not None for st in flexi.requests.values())
    if count:
        with flexi_reads_only(), host_reads.count_host_reads() as reads:
            reads.pause = 1  # counted only inside the hook
            t0 = time.perf_counter()
            outs = engine.step()
            seconds = time.perf_counter() - t0
    else:  # the step's wall time without the counting's overhead
        t0 = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t0
    info = {
        "reads": reads.n if count else None,
        "rerank_offloaded": due_offloaded,
        "hand_offs": flexi.offloads - offloads,
        "extensions": flexi.extensions - extensions,
        "seconds": seconds,
    }
    return outs, info


def run(
    engine, prompts: list[list[int]], max_tokens: int, count: bool = True
) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """Decode `prompts` greedily to completion: (per step `counted_step`'s record (count),
    each request's tokens)."""
    from moska import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"reads{i}", p, params)
    steps, tokens = [], {}
    while engine.has_unfinished_requests():
        outs, info = counted_step(engine, count)
        steps.append(info)
        for out in outs:
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    return steps, tokens


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    rr = [s for s in steps if s["rerank_offloaded"] and not s["hand_offs"]]
    other = [s for s in steps if not s["rerank_offloaded"] and not s["hand_offs"]]
    ho = [s for s in steps if s["hand_offs"]]

    def stats(xs):
        r = [s["reads"] for s in xs if s["reads"] is not None]
        t = sorted(s["seconds"] for s in xs)
        return {
            "steps": len(xs),
            "reads_max": max(r, default=None),
            "reads_mean": sum(r) / len(r) if r else None,
            "seconds_median": t[len(t) // 2] if t else None,
        }

    return {"rerank_steps": stats(rr), "hand_off_steps": stats(ho), "other_steps": stats(other)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=48, help="prompt tokens (+3 per request)")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: built-in tiny)")
    ap.add_argument("--flexicache", default="k=2,recent=1,sink=1,threshold=0.5,r=2")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--num-kv-blocks", type=int, default=1024)
    ap.add_argument("--no-count", action="store_true", help="wall times only, nothing counted")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from moska import LLM

    if args.cpu_dry_run:
        args.requests, args.tokens = min(args.requests, 4), min(args.tokens, 12)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_dry_run else "cpu"
    dtype = "float32" if device == "cpu" else "float16"
    llm = LLM(
        args.model, device=device, dtype=dtype,
        attention="torch" if device == "cpu" else "triton", num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size, flexicache=args.flexicache,
    )  # fmt: skip
    flexi = llm.engine.runner.flexi
    flexi.min_saving = 0
    flexi.extend_pages = 1
    vocab = min(llm.engine.runner.mcfg.vocab_size, 200)
    prompts = [
        [(7 * i + 3 * j) % vocab for j in range(args.prompt + 3 * i)] for i in range(args.requests)
    ]
    steps, _ = run(llm.engine, prompts, args.tokens, count=not args.no_count)
    layers = flexi.num_layers
    result = {
        "environment": environment(),
        "shapes": {"requests": args.requests, "layers": layers, "heads": flexi.num_kv_heads,
                   "block_size": args.block_size, "prompt": args.prompt, "tokens": args.tokens,
                   "num_kv_blocks": args.num_kv_blocks},
        "flexicache": args.flexicache,
        "device": device,
        "dtype": dtype,
        "steps": steps,
        "summary": {**summarize(steps), "offloads": flexi.offloads,
                    "extensions": flexi.extensions, **flexi.stats()},
    }  # fmt: skip
    print(result["summary"])
    if args.out:
        print("wrote", write_json(args.out, result))


if __name__ == "__main__":
    main()
