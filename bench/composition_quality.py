"""What composing position-independent libraries costs in quality, and what boundary repair
buys back: token loss of a request file given its package's other files, on moska-code-20m.

Workload (held-out code: networkx, installed in this venv; not in the model's training set):
for each package directory with enough files, one file is the request and the package's
other files, split round-robin into ``--libraries`` position-independent libraries (chunk
size ``--chunk-size``, the BOS chunk sink), are what it reads. Each library file is cut to
``--file-tokens`` tokens and the request to ``--request-tokens``. The loss is the mean
next-token cross-entropy (nats) over the request's tokens, in fp32 on CPU, with moska's model
code and plain-PyTorch attention:

- ``sequential``: every library file, then the request, as one causal text (each file after
  its <|endoftext|>, as in training): the reference.
- ``alone``: the request without the libraries.
- ``composed``: the libraries' chunks (each encoded alone) composed for the request, routed
  by the composition's own router (``moska.attention.composed.select_union``, key-max, per
  KV head) at top-k = all chunks and at 25% of them.
- ``repair m/L``: the libraries built with boundary repair (``moska.library.boundary_repair``,
  ``build_in_memory(..., boundary_repair=(m, L))``, what ``moska library build --repair-tokens
  m --repair-layers L`` builds): the first ``m`` tokens of every chunk that continues a file
  are re-encoded with the file's preceding chunk as context (RoPE positions so that the chunk
  keeps its own), and their KV replaced in the first ``L`` layers (EPIC/CacheBlend-style; no
  change to the other tokens); the routing index is built from the repaired keys. (Runs
  before session 17 repaired a copy of the built libraries here, with ``--repair-window``
  128 = the chunk size, and kept the unrepaired routing index.)

Costs, per setting, in the same run (``costs`` in each row, means in the summary):

- prefill seconds (median of ``--repeats``, CPU, the model's forward without logits):
  ``sequential`` encodes every library file and the request; ``composed_*`` prefills only the
  request's tokens over the already built library chunks (routing included; building the
  libraries is a one-off shared by every request, reported apart as ``library_build_s``);
  repair changes the libraries once, not the request's prefill, so it costs what composed does.
- KV bytes (``moska.bench.kv_cost``: layers x 2 x KV heads x head_dim x dtype bytes x tokens):
  the KV the request holds of its own, and the libraries' shared KV (held once for all
  requests that read them).

Usage: .venv/bin/python bench/composition_quality.py [--samples 8] [--repeats 3] [--out FILE]
       .venv/bin/python bench/composition_quality.py --cpu-dry-run   (2 samples, small)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.composition_workload import save_windows, windows
from moska.attention.composed import select_union
from moska.attention.metadata import LibraryGroup
from moska.bench.common import environment
from moska.bench.kv_cost import KVDims, composition_kv
from moska.library import build_in_memory
from moska.library.boundary_repair import BoundaryRepair
from moska.library.composition import ComposedLibrary
from moska.library.positions import IndependentOptions, shared_logit_adjustment
from moska.model import DenseAttention, load_model
from moska.routing import RoutingPolicy


def causal_states(q, k, v, sm_scale, offset=0):
    """Scores [Hq, T, S] of rows q over keys k (rows causal from ``offset``), values [S,Hq,D]."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    s = torch.einsum("thd,shd->hts", q.float(), k.float().repeat_interleave(G, 1)) * sm_scale
    mask = torch.ones(T, k.shape[0], dtype=torch.bool).tril(offset)
    return s.masked_fill(~mask, -math.inf), v.float().repeat_interleave(G, 1)


@torch.inference_mode()
def loss_of(model, ids: list[int], positions, attn) -> float:
    x = torch.tensor(ids)
    hidden = model.forward(x, positions, attn)
    logits = model.compute_logits(hidden[:-1]).float()
    return float(F.cross_entropy(logits, x[1:]))


def sequential_loss(model, files: list[list[int]], request: list[int], bos: int) -> float:
    """Loss on the request's tokens after every file, as one causal text."""
    ctx = [t for f in files for t in [bos, *f]]
    ids = ctx + request
    x = torch.tensor(ids)
    with torch.inference_mode():
        hidden = model.forward(x, torch.arange(len(ids)), DenseAttention(model.config.sm_scale))
        logits = model.compute_logits(hidden[len(ctx) : -1]).float()
    return float(F.cross_entropy(logits, x[len(ctx) + 1 :]))


def composed_attention(model, comp: ComposedLibrary, top_k: int):
    """Attention for the request's rows over the composition: each layer's rows read the
    chunks the composition's router picks (all when top_k covers them), in plain PyTorch."""
    sm = model.config.sm_scale
    policy = RoutingPolicy()

    def attn(layer, q, k, v):
        T, Hq, _ = q.shape
        G = Hq // k.shape[1]
        group = LibraryGroup(comp, torch.arange(T), top_k=top_k, policy=policy, all_rows=True)
        adjust = [shared_logit_adjustment(p) for p in comp.parts]
        scales, biases = [sm * a for a, _ in adjust], [b for _, b in adjust]
        sels = select_union(q, group, layer, scales, biases, use_triton=False)
        scores, values = [], []
        for part, sel, (a, b) in zip(comp.parts, sels, adjust):
            chosen = torch.zeros(T, k.shape[1], part.num_chunks, dtype=torch.bool)
            chosen[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = True
            offs = part.chunk_offsets.long()
            owner = torch.repeat_interleave(torch.arange(part.num_chunks), offs[1:] - offs[:-1])
            rows = chosen[:, :, owner].repeat_interleave(G, 1).permute(1, 0, 2)  # [Hq, T, S]
            kp = part.k_pools[layer].float().repeat_interleave(G, 1)
            s = torch.einsum("thd,shd->hts", q.float(), kp) * sm * a + b
            scores.append(s.masked_fill(~rows, -math.inf))
            values.append(part.v_pools[layer].float().repeat_interleave(G, 1))
        s_own, v_own = causal_states(q, k, v, sm)
        p = torch.softmax(torch.cat([*scores, s_own], dim=2), dim=-1)
        return torch.einsum("hts,shd->thd", p, torch.cat([*values, v_own])).to(q.dtype)

    return attn


def composed_loss(model, comp: ComposedLibrary, request: list[int], top_k: int) -> float:
    """Loss on the request after the composition (see ``composed_attention``)."""
    off = comp.position_offset
    attn = composed_attention(model, comp, top_k)
    return loss_of(model, request, torch.arange(off, off + len(request)), attn)


@torch.inference_mode()
def prefill_seconds(model, ids: list[int], positions, make_attn, repeats: int) -> float:
    """Median seconds of the model's forward over ``ids`` (no logits: a prefill's work up to
    the last row's hidden state), after one warm-up; a fresh attention object per run."""
    x = torch.tensor(ids)
    times = []
    for i in range(repeats + 1):
        attn = make_attn()
        t = time.perf_counter()
        model.forward(x, positions, attn)
        if i:  # the first run warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_libraries(loaded, groups, file_tokens: int, chunk_size: int, repair=None) -> list:
    """One position-independent library (BOS chunk sink) per group of ``(path, ids)`` files,
    each file cut to ``file_tokens``; ``repair``: the build's ``BoundaryRepair`` (None: none)."""
    libs = []
    for i, group in enumerate(groups):
        docs = [(f.name, ids[:file_tokens]) for f, ids in group]
        lib, _ = build_in_memory(
            loaded, docs, f"lib{i}", chunk_size=chunk_size, mode="independent", progress=False,
            independent=IndependentOptions(chunk_sink=True), boundary_repair=repair,
        )  # fmt: skip
        libs.append(lib)
    return libs


def cost_summary(rows: list[dict], dims: KVDims, repeats: int) -> dict:
    """Means over the rows of the prefill seconds and the KV bytes, with what each setting
    costs: repair and top-k share composed's prefill and KV (the libraries are changed once,
    before any request; routing reads a subset of the same pools)."""
    n = len(rows)
    prefill = {
        k: sum(r["costs"]["prefill_s"][k] for r in rows) / n for k in rows[0]["costs"]["prefill_s"]
    }
    seq = prefill["sequential"]

    def kv_mean(key: str, which: str) -> int:
        return round(sum(r["costs"][which][key] for r in rows) / n)

    kv = {
        which: {
            key: kv_mean(key, which)
            for key in (
                "sequential_request_bytes",
                "composed_request_bytes",
                "library_shared_bytes",
                "request_bytes_saved",
            )
        }
        for which in ("kv_fp32", "kv_bf16")
    }
    for each in kv.values():
        s = each["sequential_request_bytes"]
        each["request_saved_pct"] = round(100 * each["request_bytes_saved"] / s, 2)
    return {
        "prefill_s_mean_of_medians": {k: round(v, 4) for k, v in prefill.items()},
        "prefill_speedup_vs_sequential": {
            k: round(seq / v, 2) for k, v in prefill.items() if k != "sequential"
        },
        "prefill_saved_pct": {
            k: round(100 * (seq - v) / seq, 1) for k, v in prefill.items() if k != "sequential"
        },
        "library_build_s_mean": round(sum(r["costs"]["library_build_s"] for r in rows) / n, 4),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "kv_bytes_per_token": {"fp32": dims.bytes_per_token, "bf16": dims.bytes_per_token // 2},
        "kv": kv,
        "note": "per setting: sequential holds and prefills the files + the request; every "
        "composed setting (top-k all / 25 %, any repair) prefills and holds only the request's "
        "tokens and reads the libraries' KV, which is held once (library_shared_bytes) for every "
        "request that composes them; a request's saving is request_bytes_saved, the libraries' "
        "cost is paid once. Repair rewrites library KV in place at build time: no request cost.",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--libraries", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=128)
    # 4 files x 384 + a 384-token request = 1,920: the sequential reference stays within the
    # model's training length (2,048), so that it is not degraded by unseen positions
    ap.add_argument("--file-tokens", type=int, default=384)
    ap.add_argument("--files-per-library", type=int, default=2)
    ap.add_argument("--request-tokens", type=int, default=384)
    ap.add_argument("--repair-tokens", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repair-layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--repeats", type=int, default=3, help="prefill timings (median)")
    ap.add_argument("--no-repair", action="store_true", help="skip the repair settings")
    ap.add_argument("--windows", default=None, help="read the windows from this JSON file")
    ap.add_argument("--save-windows", default=None, help="write the windows there and stop")
    ap.add_argument("--cpu-dry-run", action="store_true", help="2 samples, short texts")
    ap.add_argument("--out", default=str(ROOT / "bench/results/composition_quality.json"))
    args = ap.parse_args()
    if args.cpu_dry_run:
        args.samples, args.file_tokens, args.request_tokens = 2, 160, 96
        args.repair_tokens, args.repair_layers = [8], [2]
        args.repeats = 1
    if args.no_repair:
        args.repair_tokens, args.repair_layers = [], []
    torch.manual_seed(0)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    if args.save_windows:
        save_windows(args.save_windows, windows(tok, args), args.file_tokens)
        return
    bos = tok.bos_token_id
    cfg = model.config
    dims = KVDims.of(cfg, dtype_bytes=4)  # fp32: this run's KV dtype
    dims_bf16 = KVDims.of(cfg, dtype_bytes=2)  # what a bf16 engine holds
    rows = []
    t0 = time.time()
    for req_path, request, groups in windows(tok, args):
        t_build = time.perf_counter()
        libs = build_libraries(loaded, groups, args.file_tokens, args.chunk_size)
        build_s = time.perf_counter() - t_build
        comp = ComposedLibrary(tuple(libs))
        lib_files = [ids[: args.file_tokens] for g in groups for _, ids in g]
        quarter = max(1, comp.num_chunks // 4)
        row = {
            "package": str(req_path.parent).split("site-packages/")[-1],
            "request": req_path.name,
            "library_files": [[f.name for f, _ in g] for g in groups],
            "library_tokens": comp.num_tokens,
            "chunks": comp.num_chunks,
            "request_tokens": len(request),
            "top_k_25pct": quarter,
            "loss": {
                "sequential": sequential_loss(model, lib_files, request, bos),
                "alone": loss_of(
                    model,
                    request,
                    torch.arange(len(request)),
                    DenseAttention(model.config.sm_scale),
                ),
                "composed_all": composed_loss(model, comp, request, comp.num_chunks),
                "composed_top25": composed_loss(model, comp, request, quarter),
            },
        }
        for m in args.repair_tokens:
            for layers in args.repair_layers:
                repair = BoundaryRepair(m, layers)
                parts = build_libraries(loaded, groups, args.file_tokens, args.chunk_size, repair)
                fixed = ComposedLibrary(tuple(parts))
                key = f"repair_m{m}_L{layers}"
                row["loss"][f"{key}_all"] = composed_loss(model, fixed, request, comp.num_chunks)
                row["loss"][f"{key}_top25"] = composed_loss(model, fixed, request, quarter)
        ctx_tokens = sum(len(f) + 1 for f in lib_files)  # each file after its separator
        seq_ids = [t for f in lib_files for t in [bos, *f]] + request
        off = comp.position_offset
        req_pos = torch.arange(off, off + len(request))

        def dense():
            return DenseAttention(cfg.sm_scale)

        seq_s = prefill_seconds(model, seq_ids, torch.arange(len(seq_ids)), dense, args.repeats)
        comp_s = {}
        for name, k in (("composed_all", comp.num_chunks), ("composed_top25", quarter)):
            make = functools.partial(composed_attention, model, comp, k)
            comp_s[name] = prefill_seconds(model, request, req_pos, make, args.repeats)
        kv = composition_kv(dims, ctx_tokens, len(request), comp.num_tokens)
        row["costs"] = {
            "context_tokens_sequential": ctx_tokens,
            "library_build_s": round(build_s, 4),
            "prefill_s": {"sequential": round(seq_s, 4)}
            | {k: round(v, 4) for k, v in comp_s.items()},
            "prefill_saved_pct": {
                k: round(100 * (seq_s - v) / seq_s, 1) for k, v in comp_s.items()
            },
            "kv_fp32": kv,
            "kv_bf16": composition_kv(dims_bf16, ctx_tokens, len(request), comp.num_tokens),
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("request", "chunks")}), flush=True)
        print(json.dumps(row["costs"]["prefill_s"]), flush=True)
        print({k: round(v, 4) for k, v in row["loss"].items()}, flush=True)
    keys = list(rows[0]["loss"]) if rows else []  # every row has the same keys
    mean = {k: sum(r["loss"][k] for r in rows) / len(rows) for k in keys}
    seq = mean.get("sequential", float("nan"))
    summary = {
        "samples": len(rows),
        "mean_loss": {k: round(v, 4) for k, v in mean.items()},
        "vs_sequential_pct": {k: round(100 * (v - seq) / seq, 2) for k, v in mean.items()},
        "seconds": round(time.time() - t0, 1),
    }
    if rows:
        summary["costs"] = cost_summary(rows, dims, args.repeats)
    out = {
        "env": environment(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": Path(args.model).name,
        "dtype": "float32",
        "device": "cpu",
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
