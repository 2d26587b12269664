"""Why a full-rank routing index can route worse than a low-rank one: a measurement.

Runs held-out code through the engine after a library (moska-code-20m), records each
layer's query rows as the router sees them, then scores every chunk offline with key-max
indexes of several ranks built from the library's own keys, and compares each with the
truth (each chunk's exact attention mass, ``oracle_log_mass``):

- ``mass_kept``: the share of the true attention mass (mean over rows, KV heads and query
  heads) held by the chunks the scorer's top-k picks (k = 25% of chunks), per layer;
- ``first_chunk_top``: how often the scorer ranks chunk 0 (which holds <|endoftext|>, the
  attention sink) first, and how often the truth does;
- ``logit_scale``: per KV head, the spread (std over chunks) of the head's key-max score;
  the head-sum aggregate is decided by the heads with the largest spread.

Usage: python -m moska.bench.fidelity_rank --model ../shared/models/moska-code-20m
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from moska.bench.common import environment, write_json
from moska.bench.fidelity_code import code_tasks
from moska.bench.fidelity_eval import k_for, sequence_loss
from moska.kernels.router import build_routing_index, score_chunks
from moska.routing import LEGACY
from moska.routing import select as select_mod
from moska.routing.select import oracle_log_mass


def record_queries(engine, name: str, seqs, num_chunks: int) -> dict[int, torch.Tensor]:
    """layer -> [rows, Hq, D] query rows of the library group (one forward, exact routing
    is not needed: top_k = C - 1 with the legacy policy, only the queries are kept)."""
    seen: dict[int, list[torch.Tensor]] = {}
    real = select_mod.select_chunks

    def spy(q, library, layer, *a, **kw):
        seen.setdefault(layer, []).append(q.detach().float().cpu())
        return real(q, library, layer, *a, **kw)

    import moska.routing as pkg

    pkg.select_chunks = spy
    try:
        sequence_loss(engine, seqs, name, num_chunks - 1, LEGACY, report=False)
    finally:
        pkg.select_chunks = real
    return {layer: torch.cat(qs) for layer, qs in seen.items()}


def mass_kept(truth: torch.Tensor, scores: torch.Tensor, k: int) -> float:
    """truth [B, Hkv, C] log-mass; scores [B, Hkv, C]; heads summed as the router does."""
    pick = scores.sum(dim=1).topk(k, dim=-1).indices  # [B, k]
    share = torch.softmax(truth, dim=-1)  # per (row, head) over chunks
    kept = share.gather(-1, pick[:, None, :].expand(-1, share.shape[1], -1)).sum(-1)
    return float(kept.mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fidelity_rank", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="../shared/models/moska-code-20m")
    ap.add_argument("--retrieval-model", action="store_true",
                    help="--model is a train_retrieval model: its contexts as the library, "
                    "a question and its answer as the request")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--library-tokens", type=int, default=2048)
    ap.add_argument("--target-tokens", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--out", default="bench/results/fidelity_rank.json")
    args = ap.parse_args(argv)
    import tempfile

    from moska.engine.llm_engine import LLMEngine

    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine.from_model(args.model, device=args.device, dtype=args.dtype,
                                      library_root=root, enable_prefix_caching=False)  # fmt: skip
        if args.retrieval_model:
            from pathlib import Path

            from moska.bench.retrieval_tasks import RetrievalSpec, make_examples

            ex = make_examples(RetrievalSpec.load(Path(args.model)), 1, seed=123)[0]
            docs, target = [("ctx", ex.context)], ex.question + ex.answer
        else:
            task = code_tasks(engine.tokenizer, args.library_tokens, 1, args.target_tokens)[0]
            docs, target = task.library_docs, task.targets[0][1]
        info = engine.libraries.build("rank", docs, chunk_size=args.chunk_size)
        lib = engine.libraries.get("rank")
        qs = record_queries(engine, "rank", [target], info.num_chunks)
        sm = engine.loaded.model.config.sm_scale
        k = k_for(args.fraction, info.num_chunks)
        layers = []
        for layer in sorted(qs):
            q, keys = qs[layer], lib.k_pools[layer].float().cpu()
            q = q.to(keys.dtype)
            offs = lib.chunk_offsets.cpu()
            truth = oracle_log_mass(q, keys, offs, sm)  # [B, Hkv, C]
            row: dict[str, Any] = {"layer": layer, "oracle": mass_kept(truth, truth, k),
                   "truth_first_chunk_top": float((truth.sum(1).argmax(-1) == 0).float().mean())}  # fmt: skip
            pool = lib.k_pools[layer]  # the engine's dtype and device
            on_gpu = pool.is_cuda
            for r in args.ranks:
                index = build_routing_index(keys, offs, r)
                s = score_chunks(q, index, "keymax", use_triton=False)
                if on_gpu:  # the serving path too: pool-dtype index, fp16 low-rank keys, kernel
                    gi = build_routing_index(pool, lib.chunk_offsets, r)
                    sk = score_chunks(q.to(pool), gi, "keymax", use_triton=True).float().cpu()
                    row[f"rank{r}_kernel"] = round(mass_kept(truth, sk, k), 4)
                    row[f"rank{r}_kernel_vs_ref_maxdiff"] = round(float((sk - s).abs().max()), 3)
                row[f"rank{r}"] = round(mass_kept(truth, s, k), 4)
                row[f"rank{r}_first_chunk_top"] = float((s.sum(1).argmax(-1) == 0).float().mean())
                row[f"rank{r}_head_spread"] = [round(float(x), 2) for x in s.std(-1).mean(0)]
                # the same scores, each head standardized before the sum
                z = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)
                row[f"rank{r}_zsum"] = round(mass_kept(truth, z, k), 4)
                # scores as estimated log-mass (sm_scale), heads combined by mean share
                p = torch.softmax(s * sm, -1).mean(1, keepdim=True).log()
                row[f"rank{r}_share"] = round(mass_kept(truth, p.expand_as(s), k), 4)
            print(row, flush=True)
            layers.append(row)
    summary = {key: round(sum(r[key] for r in layers) / len(layers), 4)
               for key in layers[0] if key != "layer" and not key.endswith("spread")
               and not key.endswith("maxdiff")}  # fmt: skip
    write_json(args.out, {"env": environment(["moska.bench.fidelity_rank", *(argv or [])]),
                          "args": vars(args), "num_chunks": info.num_chunks, "k": k,
                          "layers": layers, "summary": summary})  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
