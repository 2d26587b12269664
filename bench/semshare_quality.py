"""SemShareKV on moska-code-20m (CPU, fp32): quality of the continuation after a prompt
whose KV was mostly reused from a similar stored prompt, the share of prefill saved, and
the reference store's steady state over many novel queries.

Workload (bench/semshare_workload.py): held-out files (networkx, sympy; tests excluded)
are the documents; a query is a variant of one — identifiers renamed, top-level functions
reordered, docstrings reworded — or a sibling file of the same folder. The store holds the
documents' first `--ref-tokens` tokens (their KV computed in full). A query's prompt is the
variant's first `--prompt` tokens; the continuation, the next `--cont` tokens, is scored.

Per (variant kind, setting): mean next-token loss of the continuation when the prompt's KV
comes from the blended prefill (`moska.semshare.blend_prefill`, the engine's code) vs when
it is computed in full; the share of prompt tokens reused (KV past the first layers from
the reference); the modeled prefill speedup L*N / (F*N + (L-F)*R) (F layers over all N
prompt tokens, the other L-F over the R recomputed ones: the linear layers' FLOPs) and the
CPU wall time of both prefills (a loaded shared CPU: indicative only); the exact prefix
cache's share for comparison (whole 16-token blocks of a common prefix). The reference is
chosen by the LSH lookup among all stored documents (retrieval is part of the test).

Steady state: `--queries` novel queries (fresh seeds) from a pool of `--pool` documents; a
miss (no plan) is computed in full and stored, as the engine does; reuse share and modeled
speedup per window of 100 queries, with the store bounded to fit the pool and to 3/4 of it.

Usage: .venv/bin/python bench/semshare_quality.py [--files 12] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import semshare_workload as wl

from moska.attention.kv_cache import PagedKVCache
from moska.bench.common import environment
from moska.bench.kv_cost import KVDims
from moska.model import load_model
from moska.semshare import SemanticReuse, SemShareConfig, blend_prefill, extend
from moska.semshare.blend import row_bucket

BS = 16


def new_cache(model, tokens: int) -> tuple[PagedKVCache, list[int]]:
    c = model.config
    blocks = -(-tokens // BS)
    cache = PagedKVCache(
        c.num_kv_layers, blocks, BS, c.num_kv_heads, c.head_dim, torch.float32, "cpu"
    )
    return cache, list(range(blocks))


def cont_loss(model, cache, table, ids: torch.Tensor, prompt: int, last=None) -> float:
    """Mean loss of ids[prompt:] given the prompt's KV in `cache` (computes [prompt-1, end));
    `last`: the prompt's last token's hidden state [1, H] computed by the blend (`finish`),
    its KV in `cache` too (computes [prompt, end))."""
    if last is not None:
        rest = extend(model, cache, table, ids[prompt:-1], prompt)
        logits = model.compute_logits(torch.cat([last, rest]))
        return float(F.cross_entropy(logits, ids[prompt:]))
    hidden = extend(model, cache, table, ids[prompt - 1 : -1], prompt - 1)
    logits = model.compute_logits(hidden)
    return float(F.cross_entropy(logits, ids[prompt:]))


def documents(tokenizer, n: int, need: int, seed: int):
    """n (path, text, ids) whose four variants all have >= need tokens."""
    files = [p for p in wl.heldout_files() if "/tests/" not in str(p)]
    by_dir: dict = {}
    for p in files:
        by_dir.setdefault(p.parent, []).append(p)
    random.Random(seed).shuffle(files)
    out = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        ids = tokenizer.encode(text)
        if len(ids) < need:
            continue
        vs = {k: wl.variant(k, p, text, seed, by_dir) for k in wl.KINDS}
        if any(v is None or len(tokenizer.encode(v)) < need for v in vs.values()):
            continue
        out.append((p, text, ids, vs))
        if len(out) == n:
            break
    return out, by_dir


def modeled_speedup(n: int, recomputed: int, layers: int, first: int) -> float:
    return layers * n / (first * n + (layers - first) * recomputed)


def prefix_share(a: list[int], b: list[int], prompt: int) -> float:
    k = 0
    while k < min(len(a), len(b), prompt - 1) and a[k] == b[k]:
        k += 1
    return (k // BS) * BS / prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--cont", type=int, default=256)
    ap.add_argument("--ref-tokens", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--row-granule",
        type=int,
        default=SemShareConfig.row_granule,
        help="rows past the boundary padded to a row bucket, as on CUDA (1: as on the CPU)",
    )
    ap.add_argument(
        "--finish",
        action="store_true",
        help="the blend computes the prompt's last token too (finish_in_blend, as the engine "
        "does when a step holds only planned prompts' last ranges); else a plain forward",
    )
    ap.add_argument(
        "--only-default",
        action="store_true",
        help="only the default setting (threshold, recompute fraction, first layers)",
    )
    ap.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="T,R,F",
        help="only these settings: threshold, recompute fraction, first layers (repeatable)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    L = len(model.layers)
    need = args.prompt + args.cont
    docs, by_dir = documents(tok, max(args.files, args.pool), need, args.seed)
    print(f"{len(docs)} documents", flush=True)
    settings = [  # (threshold, recompute fraction, first layers)
        (0.9, 0.0, 1),
        (0.9, 0.05, 1),
        (0.9, 0.15, 1),
        (0.9, 0.15, 2),
        (0.8, 0.15, 1),
    ]
    if args.only_default:
        d = SemShareConfig()
        settings = [(d.threshold, d.recompute_fraction, d.recompute_layers)]
    if args.setting:
        settings = [
            (float(t), float(r), int(f)) for t, r, f in (x.split(",") for x in args.setting)
        ]

    # --- the store: every document's first ref_tokens tokens, computed in full ---------
    def store_for(doc_ids_list, cfg, capacity=None):
        cache, table = new_cache(model, args.ref_tokens)
        cfg = (
            cfg if capacity is None else SemShareConfig(**{**cfg.__dict__, "store_bytes": capacity})
        )
        reuse = SemanticReuse(cfg, model, cache)
        for i, ids in enumerate(doc_ids_list):
            add_reference(reuse, cache, table, ids[: args.ref_tokens], f"doc{i}")
        return reuse

    def add_reference(reuse, cache, table, ids, key):
        ids_t = torch.tensor(ids)
        extend(model, cache, table, ids_t, 0)
        reuse.store.put(reuse.reference(key, ids_t, table))

    t0 = time.perf_counter()
    rows = []
    base_cfg = SemShareConfig()
    quality_docs = docs[: args.files]
    reuse = store_for([d[2] for d in quality_docs], base_cfg)
    for di, (path, text, doc_ids, vs) in enumerate(quality_docs):
        for kind in wl.KINDS:
            ids = torch.tensor(tok.encode(vs[kind])[:need])
            cache, table = new_cache(model, need)
            t = time.perf_counter()
            extend(model, cache, table, ids[: args.prompt - 1], 0)
            full_s = time.perf_counter() - t
            full = cont_loss(model, cache, table, ids, args.prompt)
            for thr, frac, first in settings:
                cfg = SemShareConfig(threshold=thr, recompute_fraction=frac, recompute_layers=first)
                reuse.config = cfg
                plan = reuse.plan(ids[: args.prompt].tolist())
                row = {
                    "doc": str(path.relative_to(path.parents[2])),
                    "kind": kind,
                    "threshold": thr,
                    "recompute_fraction": frac,
                    "recompute_layers": first,
                    "loss_full": full,
                    "full_prefill_s": full_s,
                    "prefix_cache_share": prefix_share(doc_ids, ids.tolist(), args.prompt),
                }
                if plan is None:
                    row.update(
                        planned=False,
                        loss=full,
                        reused_share=0.0,
                        speedup=1.0,
                        right_reference=None,
                    )
                    rows.append(row)
                    continue
                cache, table = new_cache(model, need)
                t = time.perf_counter()
                upto = args.prompt if args.finish else args.prompt - 1
                res = blend_prefill(
                    model,
                    cache,
                    table,
                    ids[:upto],
                    0,
                    plan.ref,
                    plan.ref_pos[:upto],
                    frac,
                    first,
                    granule=args.row_granule,
                    finish=args.finish,
                )
                blend_s = time.perf_counter() - t
                loss = cont_loss(model, cache, table, ids, args.prompt, res.hidden)
                n = args.prompt - 1
                row.update(
                    planned=True,
                    loss=loss,
                    reused_share=res.num_reused / n,
                    matched_share=plan.num_matched / args.prompt,
                    recomputed_share=res.num_recomputed / n,
                    speedup=modeled_speedup(n, res.num_recomputed, L, first),
                    blend_prefill_s=blend_s,
                    right_reference=plan.ref.key == f"doc{di}",
                )
                rows.append(row)
        print(f"doc {di + 1}/{len(quality_docs)} {time.perf_counter() - t0:.0f}s", flush=True)

    summary_quality = {}
    for thr, frac, first in settings:
        for kind in wl.KINDS:
            sel = [
                r
                for r in rows
                if r["kind"] == kind
                and (r["threshold"], r["recompute_fraction"], r["recompute_layers"])
                == (thr, frac, first)
            ]
            lf = statistics.mean(r["loss_full"] for r in sel)
            ls = statistics.mean(r["loss"] for r in sel)
            summary_quality[f"t{thr}_r{frac}_f{first}/{kind}"] = {
                "loss_full": round(lf, 4),
                "loss_semshare": round(ls, 4),
                "loss_increase_pct": round(100 * (ls - lf) / lf, 2),
                "reused_share": round(statistics.mean(r["reused_share"] for r in sel), 3),
                "planned_share": round(sum(r["planned"] for r in sel) / len(sel), 3),
                "modeled_prefill_speedup": round(len(sel) / sum(1 / r["speedup"] for r in sel), 2),
                "cpu_wall_speedup": round(
                    sum(r["full_prefill_s"] for r in sel)
                    / sum(r.get("blend_prefill_s", r["full_prefill_s"]) for r in sel),
                    2,
                ),
                "prefix_cache_share": round(
                    statistics.mean(r["prefix_cache_share"] for r in sel), 3
                ),
            }
    print(json.dumps(summary_quality, indent=1), flush=True)

    # --- steady state --------------------------------------------------------------
    pool = docs[: args.pool]
    steady = {}
    cfg = SemShareConfig()
    one = store_for([pool[0][2]], cfg)
    per_doc = one.store.nbytes
    capacities = (
        ("fits_pool", int(1.25 * per_doc * len(pool))),
        ("three_quarters_pool", int(0.75 * per_doc * len(pool))),
    )
    for label, cap in capacities if args.queries > 0 else ():
        cache, table = new_cache(model, args.ref_tokens)
        reuse = SemanticReuse(SemShareConfig(store_bytes=cap), model, cache)
        rng = random.Random(args.seed + 1)
        series = []
        for q in range(args.queries):
            di = rng.randrange(len(pool))
            path, text, doc_ids, _ = pool[di]
            kind = rng.choice(("rename", "reorder", "reword"))
            v = wl.variant(kind, path, text, 1000 + q, by_dir) or text
            ids = tok.encode(v)[: args.prompt]
            plan = reuse.plan(ids)
            if plan is None:  # a miss: computed in full and stored (the engine's policy)
                add_reference(reuse, cache, table, ids, f"q{q}")
                series.append((0.0, 1.0))
                continue
            m = plan.ref_pos[:-1] >= 0
            matched = int(m.sum())
            n = len(ids) - 1
            recomputed = (n - matched) + math.ceil(cfg.recompute_fraction * matched)
            recomputed = row_bucket(recomputed, n, args.row_granule)
            series.append(
                ((n - recomputed) / n, modeled_speedup(n, recomputed, L, cfg.recompute_layers))
            )
        windows = [series[i : i + 100] for i in range(0, len(series), 100)]
        reuse_w = [statistics.mean(s for s, _ in w) for w in windows]
        speed_w = [len(w) / sum(1 / x for _, x in w) for w in windows]
        warm = speed_w[1] if len(speed_w) > 1 else speed_w[0]
        steady[label] = {
            "capacity_bytes": cap,
            "reference_bytes_each": per_doc,
            "reuse_share_per_100": [round(x, 3) for x in reuse_w],
            "modeled_speedup_per_100": [round(x, 2) for x in speed_w],
            "warm_speedup": round(warm, 2),
            "min_later_over_warm": round(min(speed_w[1:] or speed_w) / warm, 3),
            "stats": reuse.store.stats.__dict__,
            "stored": len(reuse.store),
        }
        print(label, json.dumps(steady[label]), flush=True)

    ref_bytes = per_doc
    kv_dims = KVDims.of(model.config, dtype_bytes=4)  # fp32, as the store's KV here
    ref_n = len(pool[0][2][: args.ref_tokens])  # the tokens of the reference measured
    bytes_per_token = ref_bytes / args.ref_tokens
    result = {
        "bench": "semshare_quality",
        "env": environment(),
        "model": os.path.basename(args.model),
        "dtype": "float32",
        "device": "cpu",
        "shapes": {
            "prompt": args.prompt,
            "continuation": args.cont,
            "reference": args.ref_tokens,
            "documents": len(quality_docs),
            "pool": len(pool),
            "queries": args.queries,
            "block_size": BS,
            "layers": L,
            "row_granule": args.row_granule,
            "finish": args.finish,
        },
        "settings": [
            {"threshold": t, "recompute_fraction": r, "recompute_layers": f} for t, r, f in settings
        ],
        "summary": {
            "quality": summary_quality,
            "steady_state": {
                k: {x: v[x] for x in ("warm_speedup", "min_later_over_warm", "stored")}
                for k, v in steady.items()
            },
            "kv_memory": {
                "kv_bytes_per_token": kv_dims.bytes_per_token,
                "dtype": "float32",
                "request_kv_bytes_plain_prefill": kv_dims.bytes(args.prompt),
                "request_kv_bytes_with_reuse": kv_dims.bytes(args.prompt),  # copied here
                "request_kv_saved_bytes": 0,
                "store_bytes_per_reference": per_doc,
                "store_tokens_per_reference": ref_n,
                "store_kv_bytes_per_reference": kv_dims.bytes(ref_n),
                "store_feature_bytes_per_reference": per_doc - kv_dims.bytes(ref_n),
                "note": "this bench copies reused KV into the request's own blocks (a "
                "standalone cache, references as copies: "
                f"{bytes_per_token:.0f} bytes per stored token incl. matching features). In "
                "the engine references are blocks of the paged cache and a request shares "
                "the reference blocks it would copy unchanged (moska/semshare/sharing.py): "
                "KV held per request shared vs copied in bench/semshare_kv_memory.py.",
            },
        },
        "steady_state": steady,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
