"""SemShareKV's shared blocks on a GPU: KV held per request and time to first token with
the reference's blocks shared vs copied (`moska/semshare/sharing.py`), same requests, same
run, plus the plain engine's TTFT.

Workload and model as `bench/semshare_speed.py` (whose helpers this uses): held-out code
documents of `--prompt` tokens, renamed / reordered / reworded variants and same-length
token substitutions (`semshare_kv_memory.substitute`: nothing shifts), a random-weight
Llama of `--arch` (matching on random embeddings: identical tokens in identical contexts),
one request at a time. Engines: "off" (no reuse), "share" (the default) and
"copy" (`SemShareConfig.share_blocks` off: reused KV copied into the request's own blocks,
the engine before session 17). Per request: the blocks of its table, those taken from the
reference, those from the exact prefix cache; KV held = the rest.

GPU: python3 bench/semshare_share_speed.py --tokenizer .models/moska-code-20m --arch 8b \
         --out $OUT/semshare_share_speed_8b.json
CPU check: .venv/bin/python bench/semshare_share_speed.py --cpu-dry-run --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import semshare_kv_memory as kvm
import semshare_speed as sp

from moska.bench.common import environment
from moska.config import EngineConfig
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

TWO = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
KINDS = (*sp.KINDS, "substitute")  # + same-length token edits (`semshare_kv_memory.py`)


def run(engine: LLMEngine, rid: str, ids: list[int]) -> dict:
    """One request alone (max_tokens=2, so that its blocks outlive the prompt's step): time
    to its first token, reused tokens, and its blocks once the prompt is computed."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    engine.bench_host.clear()  # type: ignore[attr-defined]
    t = time.perf_counter()
    engine.add_request(rid, ids, TWO)
    req = engine.scheduler._requests[rid]
    ttft = blocks = out = host = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
            if ttft is None and o.outputs[0].token_ids:
                sync()
                ttft = time.perf_counter() - t
                host = sp.host_ms(engine)  # host ms by stage up to the first token
        if blocks is None and req.num_computed_tokens >= len(ids):
            blocks = len(engine.block_manager.block_table(rid))
    assert out is not None and ttft is not None and blocks
    bs = engine.block_manager.block_size
    shared = getattr(req, "num_shared_blocks", 0)
    cached = out.num_cached_tokens // bs
    return {
        "ttft_s": ttft,
        "reused": out.num_reused_tokens,
        "blocks": blocks,
        "shared_blocks": shared,
        "prefix_blocks": cached,
        "held_blocks": blocks - shared - cached,
        "host_ms": host,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="8b", choices=sorted(sp.ARCHS))
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--prompt", type=int, default=5120)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="seeds per variant kind")
    ap.add_argument("--source", default="auto", choices=("auto", "heldout", "stdlib"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model and prompts on CPU")
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_share_speed.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_dry_run:
        args.arch, args.prompt, args.docs, args.repeats = "tiny", 256, 2, 1
        device, dtype = "cpu", torch.float32
    else:
        device, dtype = "cuda", torch.bfloat16
    kw = {
        "device": device,
        "dtype": "float32" if device == "cpu" else "bfloat16",
        "max_model_len": args.prompt + 64,
        "max_num_batched_tokens": args.prompt + 64,
        "enforce_eager": True,
        # references are blocks of the pool now: room for the documents' and the requests'
        "num_kv_blocks": (args.docs + 3) * -(-(args.prompt + 64) // 16),
    }
    loaded = sp.random_loaded(args.arch, Path(args.tokenizer), args.prompt + 1024, dtype, device)
    on = {"semantic_reuse": True, "semantic_store_mb": 1 << 16}
    engines = {name: LLMEngine(EngineConfig(model=None, **kw, **x), loaded)
               for name, x in (("off", {}), ("share", on), ("copy", on))}  # fmt: skip
    for eng in engines.values():
        sp.time_host_stages(eng)
    copy = engines["copy"].semshare
    assert copy is not None
    copy.config = dataclasses.replace(copy.config, share_blocks=False)
    tok = engines["off"].tokenizer
    docs, by_dir = sp.documents(tok, args.docs, args.prompt, args.source)
    if not docs:
        raise SystemExit("no documents of that many tokens")
    warm = min(512, args.prompt // 4)
    for name, eng in engines.items():  # kernels, allocator; a short original and a variant
        for i, kind in enumerate(("original", "rename")):
            run(eng, f"warm-{name}-{i}", sp.join(tok, docs[-1], kind, 0, by_dir, warm))
    rows = []
    for di, parts in enumerate(docs):
        original = sp.join(tok, parts, "original", 0, by_dir, args.prompt)
        for name, eng in engines.items():
            run(eng, f"d{di}-orig-{name}", original)  # stored by the reuse engines
        for kind in KINDS:
            for seed in range(args.repeats):
                if kind == "substitute":  # same-length edits of the original (no shift)
                    ids = kvm.substitute(original, len(original), 100 * di + seed)
                else:
                    ids = sp.join(tok, parts, kind, 100 + seed, by_dir, args.prompt)
                r = {"doc": str(parts[0][0].parent.name), "kind": kind, "seed": seed}
                r["tokens"] = len(ids)
                for name, eng in engines.items():
                    r[name] = run(eng, f"d{di}-{kind}-{seed}-{name}", ids)
                rows.append(r)
                print(json.dumps(r), flush=True)
    block_bytes = 2 * engines["share"].runner.cache.k[:, 0].numel()
    block_bytes *= engines["share"].runner.cache.k.element_size()
    summary = {"block_bytes": block_bytes}
    for kind in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        held = {m: sum(r[m]["held_blocks"] for r in sel) for m in ("share", "copy")}
        summary[kind] = {
            "requests": len(sel),
            "kv_held_mb_share": round(held["share"] * block_bytes / 2**20, 1),
            "kv_held_mb_copy": round(held["copy"] * block_bytes / 2**20, 1),
            "kv_saved": round(1 - held["share"] / max(1, held["copy"]), 4),
            "kv_saved_per_request": [
                round(1 - r["share"]["held_blocks"] / max(1, r["copy"]["held_blocks"]), 4)
                for r in sel
            ],
            "reused_share": round(
                statistics.mean(r["share"]["reused"] / r["tokens"] for r in sel), 3
            ),
            "ttft_ms": {
                m: round(1000 * statistics.median(r[m]["ttft_s"] for r in sel), 2)
                for m in ("off", "share", "copy")
            },
            "speedup_share": round(
                statistics.median(r["off"]["ttft_s"] / r["share"]["ttft_s"] for r in sel), 2
            ),
            "speedup_copy": round(
                statistics.median(r["off"]["ttft_s"] / r["copy"]["ttft_s"] for r in sel), 2
            ),
            "host_ms": {
                m: sp.median_stages([r[m]["host_ms"] for r in sel]) for m in ("share", "copy")
            },
        }
    share = engines["share"].semshare
    assert share is not None
    for eng in engines.values():
        eng.block_manager.check_integrity()
    result = {
        "bench": "semshare_share_speed",
        "env": environment(),
        "model": f"random llama {args.arch}",
        "arch": sp.ARCHS[args.arch],
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "cpu_dry_run": args.cpu_dry_run,
        "shapes": {"prompt": args.prompt, "docs": len(docs), "repeats": args.repeats},
        "engine": kw,
        "semshare": share.config.__dict__,
        "store": {"entries": len(share.store), "bytes": share.store.nbytes},
        # blend tails replayed as a captured graph vs run eagerly (a row count off the buckets)
        "graphs": {
            name: [eng.semshare.graphs.replays, eng.semshare.graphs.eager]
            for name, eng in engines.items()
            if eng.semshare is not None and eng.semshare.graphs is not None
        },
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
