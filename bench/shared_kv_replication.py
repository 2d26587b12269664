"""Per-shared-rank load per forward of an engine with shared-KV ranks, by chunk id and with
hot-chunk replicas, under Zipf routing (CPU, gloo, the built-in tiny model).

The engine runs for real (rank 0 routes, the query rows go to the shared ranks over
all-to-all, each attends its chunks, the states come back and merge); only the routing
decision is replaced by a Zipf draw (each row reads top_k distinct chunks, chunk c with
probability ~ 1 / rank(c)^s: `moska.bench.shared_kv_load.zipf_selections`), so that the
skew is known. Phase 1 runs `--forwards` decode forwards with chunk c on shared rank
c % M; then `replicate_hot_chunks` plans `--slots` copies per rank from phase 1's reader
counts and the shared ranks load them; phase 2 runs as many forwards again. Load =
selections (query-head group x chunk pairs) each rank attends per forward, from the
engine's counter (`SharedKVAttention.loads`). Step times are CPU wall times of this
2-core box under other load: not speed figures.

Usage: python bench/shared_kv_replication.py [--shared 3 --chunks 48 --batch 16 --top-k 4
       --zipf-s 1.1 --slots 2 --forwards 12] [--out bench/results/shared_kv_replication_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moska.attention.shared as shared_routing
from moska.bench.common import environment
from moska.bench.shared_kv_load import zipf_selections
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams


def zipf_routing(s: float, seed: int):
    """A stand-in for `route_group`: Zipf draws over the group's library."""
    gen = torch.Generator().manual_seed(seed)

    def route(ops, layer, q_rows, group, sm_scale, keymax_programs=None):
        lib = group.library
        hkv = lib.k_pools[layer].shape[1]
        k = min(group.top_k, lib.num_chunks)
        return zipf_selections(q_rows.shape[0], lib.num_chunks, k, hkv, s, gen)

    return route


def run_phase(engine, forwards: int) -> tuple[dict, float]:
    remote = engine.libraries.shared_kv
    remote.loads.clear()
    t0 = time.perf_counter()
    for _ in range(forwards):
        engine.step()
    ms = (time.perf_counter() - t0) * 1e3 / forwards
    return remote.loads.report(), ms


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--forwards", type=int, default=12)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    shared_routing.route_group = zipf_routing(a.zipf_s, 0)
    with tempfile.TemporaryDirectory() as root:
        eng = LLMEngine.from_model(
            None, device="cpu", dtype="float32", shared_kv_ranks=a.shared, library_root=root,
            enforce_eager=True, num_kv_blocks=256, max_num_seqs=a.batch,
        )  # fmt: skip
        try:
            eng.libraries.progress = False
            g = torch.Generator().manual_seed(1)
            n = a.chunks * a.chunk_size
            ids = torch.randint(3, 200, (n,), generator=g).tolist()
            eng.libraries.build("lib", [("a.txt", ids)], chunk_size=a.chunk_size)
            params = SamplingParams(max_tokens=4 * a.forwards + 8, temperature=0.0,
                                    ignore_eos=True)  # fmt: skip
            for i in range(a.batch):
                eng.add_request(f"r{i}", [5 + i, 6, 7], params, library="lib",
                                top_k_chunks=a.top_k)  # fmt: skip
            eng.step()  # the prefill forward (not measured)
            by_id, ms_by_id = run_phase(eng, a.forwards)
            placement = eng.libraries.replicate_hot_chunks("lib", a.slots)
            replicated, ms_rep = run_phase(eng, a.forwards)
            mc = eng.loaded.config
        finally:
            eng.shutdown()
    report = {
        "config": {
            "shared_ranks": a.shared,
            "unique_ranks": 1,
            "chunks": a.chunks,
            "chunk_size": a.chunk_size,
            "batch": a.batch,
            "top_k": a.top_k,
            "zipf_s": a.zipf_s,
            "slots_per_rank": a.slots,
            "forwards_per_phase": a.forwards,
            "model": {
                "layers": mc.num_layers,
                "q_heads": mc.num_heads,
                "kv_heads": mc.num_kv_heads,
                "head_dim": mc.head_dim,
            },
            "dtype": "float32",
            "device": "cpu",
            "backend": "gloo",
        },
        "replicas": {c: list(h) for c, h in enumerate(placement.holders) if len(h) > 1},
        "by_chunk_id": {**by_id, "step_ms_cpu": round(ms_by_id, 1)},
        "replicated": {**replicated, "step_ms_cpu": round(ms_rep, 1)},
        "environment": environment(argv),
    }
    report["summary"] = {
        "imbalance_mean_forward": {
            "by_chunk_id": by_id["imbalance_mean_forward"],
            "replicated": replicated["imbalance_mean_forward"],
        },
        "imbalance_worst_forward": {
            "by_chunk_id": by_id["imbalance_worst_forward"],
            "replicated": replicated["imbalance_worst_forward"],
        },
        "note": "selections per shared rank per decode forward, all layers; CPU step "
        "times are of a loaded 2-core box and not speed figures",
    }
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
