"""SemShareKV prefill speed in the engine: time to first token of near-duplicate prompts
with `semantic_reuse` on vs off (same model, same requests, in the same run).

Documents: held-out code files (networkx/sympy when installed, else the standard library)
of one folder joined until a document has `--prompt` tokens. Per document the original
is sent first (the reuse engine stores it), then one variant per kind (identifiers renamed,
top-level definitions reordered, docstrings reworded: `bench/semshare_workload.py`), each
one request of max_tokens=1 in an otherwise idle engine; TTFT = add_request until its
output is on the host (matching included). Prefix caching stays on in both engines.
`--eager-too`: a reuse engine without the blend's CUDA graphs (`moska/semshare/graphs.py`);
`--decode-graphs`: the engines as served (not --enforce-eager), so a reused prompt's last
token, which the step's ordinary forward computes, runs as a decode graph replay.

Model: `--model DIR` (any Llama-family checkpoint and its tokenizer), or by default a
random-weight Llama of `--arch` built here (speed does not need trained weights; matching
runs on its random embeddings, where only identical tokens in identical contexts match)
with the tokenizer of `--tokenizer` (moska-code-20m's).

GPU: python3 bench/semshare_speed.py --tokenizer .models/moska-code-20m \
         --out $OUT/semshare_speed.json   (.models/ holds a copy of the model folder)
CPU check: .venv/bin/python bench/semshare_speed.py --cpu-dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import semshare_workload as wl

from moska.bench.common import LLAMA_3_1_8B, environment
from moska.config import EngineConfig
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")  # fmt: skip
ARCHS = {  # random-weight Llama shapes
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
    "8b": {k: LLAMA_3_1_8B[k] for k in SHAPE_KEYS},  # the project's 8B dims
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    },
}
KINDS = ("rename", "reorder", "reword")


def random_loaded(arch: str, tokenizer_dir: Path, max_len: int, dtype, device: str):
    """A random-weight Llama of `arch` built on `device` in memory (no checkpoint written:
    an 8B model's 15 GiB would take most of a device session to write and load), with the
    tokenizer of `tokenizer_dir`; every engine of the run shares its weights."""
    from moska.bench.common import random_loaded_model
    from moska.model.tokenizer import Tokenizer

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    hf = dict(
        ARCHS[arch],
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        max_position_embeddings=max_len,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    loaded = random_loaded_model(hf, dtype, device)
    tokenizer = Tokenizer.from_pretrained(
        tokenizer_dir, extra_eos_token_ids=loaded.config.eos_token_ids
    )
    return loaded._replace(tokenizer=tokenizer)


def source_files(source: str) -> list[Path]:
    files = None
    if source in ("auto", "heldout"):
        try:
            files = wl.heldout_files()
        except SystemExit:  # no networkx/sympy here
            if source == "heldout":
                raise
    if files is None:  # the standard library's sources, package by package
        base = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(
            p
            for p in base.rglob("*.py")
            if p.stat().st_size <= wl.MAX_FILE_BYTES
            and not {"site-packages", "dist-packages", "idlelib"} & set(p.parts)
        )
    return [p for p in files if "/tests/" not in str(p) and "/test/" not in str(p)]


def documents(tokenizer, n: int, tokens: int, source: str):
    """n lists of (path, text) of one folder, each list >= tokens tokens, in every variant."""
    by_dir: dict = {}
    for p in source_files(source):
        by_dir.setdefault(p.parent, []).append(p)
    docs = []
    for folder in sorted(by_dir):
        parts, count = [], 0
        for p in by_dir[folder]:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if any(wl.variant(k, p, text, 0, by_dir) is None for k in KINDS):
                continue
            parts.append((p, text))
            count += len(tokenizer.encode(text, add_special_tokens=False))
            if count >= tokens * 1.3:  # variants may tokenize shorter
                break
        if count >= tokens * 1.3:
            docs.append(parts)
            if len(docs) == n:
                break
    return docs, by_dir


def join(tokenizer, parts, kind, seed, by_dir, tokens: int) -> list[int]:
    texts = [t if kind == "original" else wl.variant(kind, p, t, seed, by_dir) for p, t in parts]
    return tokenizer.encode("\n\n".join(texts))[:tokens]


def time_host_stages(engine: LLMEngine) -> None:
    """Wrap the engine's stages on this instance so that `ttft` can say where a request's
    host time went: `add` (intake, the reuse plan included: its host syncs wait on the
    device), `plan`, each `step` (a prompt step waits for its token), within a step the
    blend's launches (`blend`), the runner's forward launch (`launch`) and storing a
    reference (`record`). Host wall times, no syncs added."""
    engine.bench_host = times = {}  # type: ignore[attr-defined]

    def wrap(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - t
                times[f"{key}_n"] = times.get(f"{key}_n", 0) + 1

        setattr(obj, name, timed)

    wrap(engine, "add_request", "add")
    wrap(engine, "step", "step")
    wrap(engine.runner, "launch", "launch")
    if engine.semshare is not None:
        for name, key in (("plan", "plan"), ("prefill", "blend"), ("record", "record")):
            wrap(engine.semshare, name, key)


def ttft(engine: LLMEngine, rid: str, ids: list[int]) -> tuple[float, int]:
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    engine.bench_host.clear()  # type: ignore[attr-defined]
    t = time.perf_counter()
    engine.add_request(rid, ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    reused = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            reused = out.num_reused_tokens
    sync()
    return time.perf_counter() - t, reused


def host_ms(engine: LLMEngine) -> dict:
    """The last `ttft`'s host stages (ms; counts as *_n)."""
    h = engine.bench_host  # type: ignore[attr-defined]
    return {k: v if k.endswith("_n") else round(1000 * v, 3) for k, v in h.items()}


def median_stages(rows: list[dict]) -> dict:
    """Per stage key, the median over `rows` (a stage a row lacks counts 0)."""
    keys = sorted({k for r in rows for k in r})
    return {k: round(statistics.median(r.get(k, 0) for r in rows), 3) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a checkpoint; default: a random --arch")
    ap.add_argument("--arch", default="1b", choices=sorted(ARCHS))
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--prompt", type=int, default=5120)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="seeds per variant kind")
    ap.add_argument(
        "--source",
        default="auto",
        choices=("auto", "heldout", "stdlib"),
        help="documents: networkx/sympy (auto: when installed) or the stdlib",
    )
    ap.add_argument("--store-mb", type=int, default=8192, help="reference store bound")
    ap.add_argument(
        "--also-fractions",
        type=float,
        nargs="*",
        default=[],
        help="more reuse engines, at these recompute fractions (engine 'on_r<f>')",
    )
    ap.add_argument(
        "--eager-too",
        action="store_true",
        help="one more reuse engine without CUDA graphs past the boundary ('on_eager')",
    )
    ap.add_argument(
        "--no-finish-too",
        action="store_true",
        help="one more reuse engine whose step forward computes a reused prompt's last token "
        "(finish_in_blend off: the blend stops one token short) ('on_nofinish')",
    )
    ap.add_argument(
        "--decode-graphs",
        action="store_true",
        help="the engines' decode CUDA graphs on (not --enforce-eager): a reused prompt's last "
        "token, computed by the step's ordinary forward, is then one replay",
    )
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model and prompts on CPU")
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_speed.json"))
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
        "enforce_eager": not args.decode_graphs,
        "num_kv_blocks": 4 * -(-(args.prompt + 64) // 16),
    }
    if args.decode_graphs:  # one request at a time: a few decode batch sizes to capture
        kw["max_num_seqs"] = 4
    loaded = None
    if args.model is None:  # one random model in memory, shared by every engine
        loaded = random_loaded(args.arch, Path(args.tokenizer), args.prompt + 1024, dtype, device)

    def engine(**extra) -> LLMEngine:
        if loaded is None:
            return LLMEngine.from_model(args.model, **kw, **extra)
        return LLMEngine(EngineConfig(model=None, **kw, **extra), loaded)

    # a 5K-token reference of an 8B model is 1.3 GiB of KV: more than the default store
    on = {"semantic_reuse": True, "semantic_store_mb": args.store_mb}
    engines = {"off": engine(), "on": engine(**on)}
    if args.eager_too:  # control: reuse on, the layers past the boundary launched one by one
        engines["on_eager"] = engine(**on)
        engines["on_eager"].semshare.graphs = None  # type: ignore[union-attr]
    if args.no_finish_too:  # control: the last token by the step's forward, as before
        engines["on_nofinish"] = engine(**on)
        reuse = engines["on_nofinish"].semshare
        assert reuse is not None
        reuse.config = dataclasses.replace(reuse.config, finish_in_blend=False)
    for f in args.also_fractions:  # the same requests at other recompute fractions
        engines[f"on_r{f}"] = engine(**on, semantic_recompute_fraction=f)
    for eng in engines.values():
        time_host_stages(eng)
    tok = engines["off"].tokenizer
    docs, by_dir = documents(tok, args.docs, args.prompt, args.source)
    if not docs:
        raise SystemExit("no documents of that many tokens")
    for name, eng in engines.items():  # warm-up (kernels, allocator): never stored
        for i in range(2):
            ttft(eng, f"warm-{name}-{i}", join(tok, docs[0], "original", 0, by_dir, 8))
    # the reuse path's own warm-up: a short original (stored: a reference too short to win
    # any later lookup) and a variant of it (planned and blended), so the first measured
    # variant pays no one-off costs (allocator growth, lazy library init)
    warm = max(2 * engines["on"].semshare.config.min_prompt_tokens, min(512, args.prompt // 4))
    for name in [n for n in engines if n != "off"]:
        for i, kind in enumerate(("original", "rename")):
            ttft(engines[name], f"warm-{name}-{i}", join(tok, docs[-1], kind, 0, by_dir, warm))
    rows = []
    for di, parts in enumerate(docs):
        original = join(tok, parts, "original", 0, by_dir, args.prompt)
        row = {"doc": str(parts[0][0].parent.name), "tokens": len(original)}
        for name, eng in engines.items():
            # reused > 0: the original itself was planned against an earlier document
            row[f"original_{name}_s"], row[f"original_reused_{name}"] = ttft(
                eng, f"d{di}-orig-{name}", original
            )
        for kind in KINDS:
            for seed in range(args.repeats):
                ids = join(tok, parts, kind, 100 + seed, by_dir, args.prompt)
                r = dict(row, kind=kind, seed=seed, tokens=len(ids))
                for name, eng in engines.items():
                    r[f"ttft_{name}_s"], r[f"reused_{name}"] = ttft(
                        eng, f"d{di}-{kind}-{seed}-{name}", ids
                    )
                    r[f"host_{name}"] = host_ms(eng)
                r["speedup"] = r["ttft_off_s"] / r["ttft_on_s"]
                if args.eager_too:
                    r["speedup_eager"] = r["ttft_off_s"] / r["ttft_on_eager_s"]
                if args.no_finish_too:
                    r["speedup_nofinish"] = r["ttft_off_s"] / r["ttft_on_nofinish_s"]
                for f in args.also_fractions:
                    r[f"speedup_r{f}"] = r["ttft_off_s"] / r[f"ttft_on_r{f}_s"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    summary = {}
    for kind in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        summary[kind] = {
            "ttft_off_ms": round(1000 * statistics.median(r["ttft_off_s"] for r in sel), 2),
            "ttft_on_ms": round(1000 * statistics.median(r["ttft_on_s"] for r in sel), 2),
            "speedup_median": round(statistics.median(r["speedup"] for r in sel), 2),
            "reused_share": round(statistics.mean(r["reused_on"] / r["tokens"] for r in sel), 3),
            "host_off_ms": median_stages([r["host_off"] for r in sel]),
            "host_on_ms": median_stages([r["host_on"] for r in sel]),
        }
        if args.eager_too:
            summary[kind]["eager"] = {
                "ttft_on_ms": round(1000 * statistics.median(r["ttft_on_eager_s"] for r in sel), 2),
                "speedup_median": round(statistics.median(r["speedup_eager"] for r in sel), 2),
            }
        if args.no_finish_too:
            summary[kind]["nofinish"] = {
                "ttft_on_ms": round(
                    1000 * statistics.median(r["ttft_on_nofinish_s"] for r in sel), 2
                ),
                "speedup_median": round(statistics.median(r["speedup_nofinish"] for r in sel), 2),
                "host_ms": median_stages([r["host_on_nofinish"] for r in sel]),
            }
        for f in args.also_fractions:
            summary[kind][f"r{f}"] = {
                "ttft_on_ms": round(1000 * statistics.median(r[f"ttft_on_r{f}_s"] for r in sel), 2),
                "speedup_median": round(statistics.median(r[f"speedup_r{f}"] for r in sel), 2),
                "reused_share": round(
                    statistics.mean(r[f"reused_on_r{f}"] / r["tokens"] for r in sel), 3
                ),
            }
    firsts = [r for r in rows if r["kind"] == KINDS[0] and r["seed"] == 0][1:]  # not doc 0
    if firsts:  # the originals after the first document: the cost of storing a reference
        summary["original"] = {
            f"ttft_{name}_ms": round(
                1000 * statistics.median(r[f"original_{name}_s"] for r in firsts), 2
            )
            for name in engines
        }
    on = engines["on"].semshare
    on.flush()  # references recorded by the last steps
    result = {
        "bench": "semshare_speed",
        "env": environment(),
        "model": args.model or f"random llama {args.arch}",
        "arch": None if args.model else ARCHS[args.arch],
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "cpu_dry_run": args.cpu_dry_run,
        "source": args.source,
        "documents": sorted({r["doc"] for r in rows}),
        "shapes": {"prompt": args.prompt, "docs": len(docs), "repeats": args.repeats},
        "engine": kw,
        "semshare": {**on.config.__dict__, "speculate": on.speculate},
        "store": {"entries": len(on.store), "bytes": on.store.nbytes, **on.store.stats.__dict__},
        "graphs": None
        if on.graphs is None
        else {"captured": len(on.graphs), "replays": on.graphs.replays, "eager": on.graphs.eager},
        "command": " ".join(sys.argv),
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
