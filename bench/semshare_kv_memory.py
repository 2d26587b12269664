"""KV memory a SemShareKV request holds, with shared blocks and with copies, through the
engine on moska-code-20m (CPU, fp32), and its continuation loss either way.

Workload as `bench/semshare_quality.py` (its `documents`: held-out networkx/sympy files,
variants renamed / reordered / reworded / sibling), plus same-length token substitutions
(`substitute`: positions never shift, where blocks can be shared): one engine with
semantic reuse stores each document's first `--ref-tokens` tokens (a request of that
prompt, computed in full: its blocks become the reference, `moska/semshare/sharing.py`);
then each variant's first `--prompt` tokens are sent twice, with
`SemShareConfig.share_blocks` on and off. Right after the prompt's step the request's table
is read: the blocks it took from the reference (shared), from the prefix cache, and the
rest (its own); its prompt KV is copied out of the engine's cache and the
next `--cont` tokens scored on it (`semshare_quality.cont_loss`), as is a full prefill's.

Usage: .venv/bin/python bench/semshare_kv_memory.py [--files 4] [--prompt 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import semshare_quality as sq
import semshare_workload as wl

from moska import LLM, SamplingParams
from moska.bench.common import environment
from moska.semshare.blend import extend, slots_of

PARAMS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
# the workload's kinds, and same-length edits: every 128th prompt token (from the 64th)
# replaced by another token of the document (a changed literal or one-token name): nothing
# after an edit shifts, the case where whole blocks keep their tokens and positions
KINDS = (*wl.KINDS, "substitute")


def substitute(ids: list[int], prompt: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = list(ids)
    for i in range(64, prompt - 1, 128):
        out[i] = rng.choice([t for t in ids[:prompt] if t != ids[i]])
    return out


def prompt_kv(llm, prompt: list[int], rid: str):
    """Run one request until its prompt is computed: (its table, blocks taken from the
    reference, from the prefix cache, reused tokens, the prompt's KV copied into a
    standalone cache + table)."""
    engine = llm.engine
    engine.add_request(rid, prompt, PARAMS)
    req = engine.scheduler._requests[rid]
    got = None
    while engine.has_unfinished_requests():
        engine.step()
        if got is None and req.num_computed_tokens >= len(prompt):
            table = list(engine.block_manager.block_table(rid))
            cache = engine.runner.cache
            plan = req.semantic
            shared = 0 if plan is None else getattr(req, "num_shared_blocks", 0)
            prefix = req.num_cached_tokens // cache.block_size  # exact prefix-cache blocks
            own, own_table = sq.new_cache(engine.loaded.model, len(prompt) + 512)
            src = slots_of(table, cache.block_size, 0, len(prompt), "cpu")
            dst = slots_of(own_table, own.block_size, 0, len(prompt), "cpu")
            flat = (cache.k.shape[0], -1, *cache.k.shape[-2:])
            own.k.view(flat)[:, dst] = cache.k.view(flat)[:, src]
            own.v.view(flat)[:, dst] = cache.v.view(flat)[:, src]
            got = (table, shared, prefix, req.num_reused_tokens, own, own_table)
    assert got is not None
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--cont", type=int, default=256)
    ap.add_argument("--ref-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_kv_memory.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    need = args.prompt + args.cont
    blocks = args.files * (args.ref_tokens // sq.BS + 2) + 4 * (need // sq.BS + 2)
    llm = LLM(
        args.model, device="cpu", dtype="float32", attention="torch", num_kv_blocks=blocks,
        max_model_len=max(args.ref_tokens, need) + 8, semantic_reuse=True,
        max_num_batched_tokens=max(args.ref_tokens, need) + 8, block_size=sq.BS,
    )  # fmt: skip
    model, tok = llm.engine.loaded.model, llm.engine.tokenizer
    reuse = llm.engine.semshare
    cache = llm.engine.runner.cache
    block_bytes = 2 * cache.k[:, 0].numel() * cache.k.element_size()
    docs, _ = sq.documents(tok, args.files, max(need, args.ref_tokens), args.seed)
    t0 = time.perf_counter()
    for i, (_, _, ids, _) in enumerate(docs):
        prompt_kv(llm, ids[: args.ref_tokens], f"doc{i}")
    refs = reuse.store.lru_entries()
    doc_keys = {r.key for r in refs}
    rows = []
    for di, (path, _, doc_ids, vs) in enumerate(docs):
        for kind in KINDS:
            if kind == "substitute":
                ids = torch.tensor(substitute(doc_ids[:need], args.prompt, di))
            else:
                ids = torch.tensor(tok.encode(vs[kind])[:need])
            prompt = ids[: args.prompt].tolist()
            row: dict = {"doc": str(path).split("site-packages/")[-1], "kind": kind}
            full, full_table = sq.new_cache(model, need)
            extend(model, full, full_table, ids[: args.prompt], 0)
            row["loss_full"] = sq.cont_loss(model, full, full_table, ids, args.prompt)
            for mode, on in (("shared", True), ("copied", False)):
                if mode == "copied" and row["shared"]["reused_tokens"] == 0:
                    # not planned: both modes compute it in full (and a second run would
                    # take the first's blocks from the prefix cache)
                    row[mode] = dict(row["shared"])
                    continue
                reuse.config = dataclasses.replace(reuse.config, share_blocks=on)
                got = prompt_kv(llm, prompt, f"{kind}{di}{mode}")
                table, shared, prefix, reused, own, own_table = got
                for ref in reuse.store.lru_entries():  # a query computed in full was stored:
                    if ref.key not in doc_keys:  # out again, so both modes see one store
                        reuse.store.evict(ref.key)
                row[mode] = {
                    "reused_tokens": reused,
                    "blocks": len(table),
                    "shared_blocks": shared,  # taken from the reference
                    "prefix_blocks": prefix,  # taken from the exact prefix cache
                    "kv_bytes_held": (len(table) - shared - prefix) * block_bytes,
                    "loss": sq.cont_loss(model, own, own_table, ids, args.prompt),
                }
            s, c = row["shared"], row["copied"]
            row["kv_saved"] = 1 - s["kv_bytes_held"] / c["kv_bytes_held"]
            row["loss_shared_minus_copied"] = s["loss"] - c["loss"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind]
        planned = [r for r in rs if r["shared"]["reused_tokens"] > 0]
        summary[kind] = {
            "requests": len(rs),
            "planned": len(planned),
            "kv_bytes_held_copied": sum(r["copied"]["kv_bytes_held"] for r in rs),
            "kv_bytes_held_shared": sum(r["shared"]["kv_bytes_held"] for r in rs),
            "kv_saved": 1
            - sum(r["shared"]["kv_bytes_held"] for r in rs)
            / sum(r["copied"]["kv_bytes_held"] for r in rs),
            "kv_saved_per_request": [round(r["kv_saved"], 4) for r in rs],
            "loss_change_vs_full": statistics.fmean(
                r["shared"]["loss"] / r["loss_full"] - 1 for r in rs
            ),
            "max_abs_loss_shared_minus_copied": max(abs(r["loss_shared_minus_copied"]) for r in rs),
        }
    ref_bytes = [r.nbytes for r in refs]
    shapes = {"prompt": args.prompt, "cont": args.cont, "ref_tokens": args.ref_tokens}
    shapes.update(block_size=sq.BS, block_bytes=block_bytes, files=len(docs))
    out = {
        "bench": "semshare_kv_memory",
        "command": " ".join(["bench/semshare_kv_memory.py", *sys.argv[1:]]),
        "environment": environment(),
        "model": args.model,
        "dtype": "float32",
        "device": "cpu",
        "shapes": shapes,
        "summary": {
            "per_kind": summary,
            "reference_bytes_each": ref_bytes,
            "note": "kv_bytes_held: the request's own blocks (its table less the blocks it "
            "took from the reference or, an exact prefix, from the prefix cache) once its "
            "prompt is computed; 'copied' is the engine before sharing (prefix-cache blocks "
            "shared, the rest its own). References are blocks of the paged cache "
            "(the reference's full blocks shared with the request that computed it, its "
            "last block copied) plus fp16 matching features, no second copy of the KV.",
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
